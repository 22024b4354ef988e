"""The exception tree: Kafka's codes where Kafka has one, and clear import failures."""
import subprocess
import sys

from shmbroker import errors


def test_codes_match_kafka_for_shared_conditions():
    assert errors.CorruptRecordError.code == 2
    assert errors.OffsetOutOfRangeError.code == 1
    assert errors.RecordTooLargeError.code == 10
    assert errors.UnknownTopicOrPartitionError.code == 3
    assert errors.UnknownTopicOrPartitionError.retriable


def test_every_decode_error_is_a_corrupt_record_error():
    for cls in (errors.TruncatedBatchError, errors.InvalidMagicError, errors.CrcMismatchError,
                errors.InvalidRecordError, errors.CorruptSegmentError):
        assert issubclass(cls, errors.CorruptRecordError)
        assert issubclass(cls, errors.ShmbrokerError)


def test_errors_by_code_finds_the_most_general_class():
    assert errors.ERRORS_BY_CODE[2] is errors.CorruptRecordError
    assert errors.ERRORS_BY_CODE[10] is errors.RecordTooLargeError


def test_missing_native_extension_fails_loudly_with_build_instructions():
    code = ("import sys; sys.modules['shmbroker._native'] = None\n"
            "from shmbroker import records\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "NativeExtensionMissing" in proc.stderr
    assert "make native" in proc.stderr
