"""The Kafka codec: lengths and counts are checked against the bytes present, so truncated or
absurd requests are typed errors, never huge allocations or long loops."""
import struct

import pytest

from shmbroker import errors
from shmbroker.kafka import messages as M
from shmbroker.kafka.codec import Reader, Writer


@pytest.mark.parametrize("data", [b"\x7f\xff", b"\x00\x05ab", b"\xff\xfe"])
def test_a_string_longer_than_the_frame_or_negative_is_malformed(data):
    with pytest.raises(errors.MalformedKafkaRequestError):
        Reader(memoryview(data)).string()


def test_an_array_count_beyond_the_bytes_left_is_malformed_before_any_element_is_read():
    with pytest.raises(errors.MalformedKafkaRequestError):
        Reader(memoryview(struct.pack(">i", 2 ** 31 - 1) + b"\x00" * 8)).array_count()
    assert Reader(memoryview(b"\xff\xff\xff\xff")).array_count(nullable=True) == -1


def test_writer_and_reader_agree_on_every_primitive():
    w = Writer().int8(-3).int16(-2).int32(7).int64(-9).boolean(True).string("hé").string(None)
    w.bytes_(b"xyz").array([1, 2], lambda w, v: w.int32(v))
    r = Reader(memoryview(bytes(w.buf)))
    assert (r.int8(), r.int16(), r.int32(), r.int64(), r.boolean(), r.string(),
            r.nullable_string(), bytes(r.nullable_bytes()), r.int32_array()) == \
        (-3, -2, 7, -9, True, "hé", None, b"xyz", [1, 2])


def test_api_versions_above_ours_get_kafkas_v0_fallback_body():
    assert M.api_versions_response(3) == bytes.fromhex("0023 00000001 0012 0000 0002")
    body = M.api_versions_response(1)
    assert body[:2] == b"\x00\x00" and struct.unpack(">i", body[2:6])[0] == len(M.SUPPORTED)


def test_no_served_version_is_flexible():
    flexible_from = {M.PRODUCE: 9, M.FETCH: 12, M.LIST_OFFSETS: 6, M.METADATA: 9,
                     M.API_VERSIONS: 3, M.CREATE_TOPICS: 5, M.OFFSET_COMMIT: 8,
                     M.OFFSET_FETCH: 6, M.FIND_COORDINATOR: 3, M.JOIN_GROUP: 6,
                     M.HEARTBEAT: 4, M.LEAVE_GROUP: 4, M.SYNC_GROUP: 4, M.INIT_PRODUCER_ID: 2,
                     M.DESCRIBE_GROUPS: 5, M.LIST_GROUPS: 3}
    assert flexible_from.keys() == M.SUPPORTED.keys()
    assert all(M.SUPPORTED[k][1] < v for k, v in flexible_from.items())


def test_consumer_protocol_bytes_match_kafka_pythons_own_codec():
    """The subscription we build for a Kafka leader and the assignment we hand each member
    are read by kafka-python's own ConsumerProtocol classes as we meant them."""
    cp = pytest.importorskip("kafka.protocol.old.consumer_protocol")
    sub = cp.ConsumerProtocolMemberMetadata_v0.decode(M.encode_subscription(["b", "a"]))
    assert sorted(sub.topics) == ["a", "b"]
    assignment = cp.ConsumerProtocolMemberAssignment_v0.decode(
        M.encode_assignment([("t", 3), ("s", 0), ("t", 1)]))
    assert sorted((t, sorted(ps)) for t, ps in assignment.assigned_partitions) == [
        ("s", [0]), ("t", [1, 3])]
    own = cp.ConsumerProtocolMemberMetadata_v0(0, ["x", "y"], b"").encode()
    assert M.decode_subscription_topics(own) == ["x", "y"]


def test_group_listings_decode_with_kafka_pythons_own_classes_in_every_version_they_have():
    """ListGroups v0-2 and DescribeGroups v0-3 as kafka-python's classic classes read them
    (v4, which adds the group instance id, is read by its newer codec in
    tests/integration/test_kafka_groups.py)."""
    old = pytest.importorskip("kafka.protocol.old.admin")
    for version in range(3):
        got = old.ListGroupsResponse[version].decode(
            M.list_groups_response(version, 0, [("g1", "consumer"), ("g2", "")]))
        assert got.error_code == 0 and [tuple(g) for g in got.groups] == [
            ("g1", "consumer"), ("g2", "")]
    member = M.DescribedMember("m-1", None, "client", "/127.0.0.1",
                               M.encode_subscription(["t"]), M.encode_assignment([("t", 0)]))
    groups = [M.DescribedGroup(0, "g", "Stable", "consumer", "range", (member,)),
              M.DescribedGroup(0, "gone", "Dead", "", "")]
    for version in range(4):
        got = old.DescribeGroupsResponse[version].decode(M.describe_groups_response(version, groups))
        first, second = got.groups
        assert (first[0], first[1], first[2], first[3], first[4]) == (0, "g", "Stable", "consumer", "range")
        assert [tuple(m)[:3] for m in first[5]] == [("m-1", "client", "/127.0.0.1")]
        assert (second[1], second[2], list(second[5])) == ("gone", "Dead", [])
