"""The listener's idempotent-producer checks (kafka/idempotence.py), as plain code."""
import pytest

from shmbroker import errors, records
from shmbroker.kafka.idempotence import ProducerStates, batch_ids


def test_batch_ids_read_the_producer_fields_and_skip_plain_batches():
    batch = records.encode_batch([b"x", b"y"], producer_id=7, producer_epoch=2, base_sequence=10)
    assert batch_ids(batch) == (7, 2, 10, 11)
    assert batch_ids(records.encode_batch([b"x"])) is None  # producer id -1: not idempotent
    assert batch_ids(batch[:20]) is None


def test_a_retry_in_flight_waits_a_retry_after_the_append_is_a_duplicate():
    states = ProducerStates()
    ids = (1, 0, 0, 2)
    assert states.check("t", 0, ids) is None
    with pytest.raises(errors.RequestTimeoutError):
        states.check("t", 0, ids)  # still being appended
    states.done("t", 0, ids, 40)
    assert states.check("t", 0, ids) == 40
    assert states.check("t", 1, ids) is None, "sequences are per partition"


def test_a_refused_batch_is_forgotten_so_its_retry_is_appended():
    states = ProducerStates()
    assert states.check("t", 0, (1, 0, 0, 0)) is None
    states.done("t", 0, (1, 0, 0, 0), None)
    assert states.check("t", 0, (1, 0, 0, 0)) is None


def test_gaps_old_epochs_and_new_epochs():
    states = ProducerStates()
    assert states.check("t", 0, (1, 3, 0, 0)) is None
    states.done("t", 0, (1, 3, 0, 0), 0)
    with pytest.raises(errors.OutOfOrderSequenceError):
        states.check("t", 0, (1, 3, 5, 5))
    with pytest.raises(errors.InvalidProducerEpochError):
        states.check("t", 0, (1, 2, 1, 1))
    assert states.check("t", 0, (1, 4, 0, 0)) is None, "a new epoch starts its sequences again"


def test_sequences_wrap_at_int32_and_states_are_bounded():
    states = ProducerStates(states_max=2)
    top = (1 << 31) - 1
    assert states.check("t", 0, (1, 0, top, top)) is None
    states.done("t", 0, (1, 0, top, top), 5)
    assert states.check("t", 0, (1, 0, 0, 0)) is None, "after INT32 max comes 0"
    for pid in (2, 3):
        states.check("t", 0, (pid, 0, 0, 0))
    assert len(states._states) == 2, "the least recently used state was forgotten"


def test_state_restored_from_the_log_answers_a_retry_as_a_duplicate_and_checks_the_next():
    """What a restarted listener does before the first idempotent batch to a partition: the
    batches found in the log's tail, in log order, become each producer's last five."""
    states = ProducerStates()
    assert not states.restored("t", 0)
    states.restore("t", 0, [(1, 0, 0, 2, 10), (2, 0, 0, 0, 13), (1, 0, 3, 4, 14),
                            (3, 0, 0, 0, 16), (3, 1, 0, 1, 17)])  # producer 3: a new epoch
    assert states.restored("t", 0) and not states.restored("t", 1)
    assert states.check("t", 0, (1, 0, 3, 4)) == 14  # the retry of the last batch
    assert states.check("t", 0, (1, 0, 0, 2)) == 10
    with pytest.raises(errors.OutOfOrderSequenceError):
        states.check("t", 0, (1, 0, 9, 9))
    assert states.check("t", 0, (1, 0, 5, 5)) is None  # the next sequence: appended
    assert states.check("t", 0, (3, 1, 0, 1)) == 17
    with pytest.raises(errors.InvalidProducerEpochError):
        states.check("t", 0, (3, 0, 1, 1))
    assert states.check("t", 1, (1, 0, 3, 4)) is None, "another partition: not restored"
