"""The filter index the cluster asks "must this message be stored?": it answers as
``topic_matches`` does over every filter it holds, and counts owners of one filter apart."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.cluster.filter_index import FilterIndex
from broker.cluster.store_interest import StoreInterest, stored_filters
from fleetcore.topics import topic_matches

_TOPIC_LEVEL = st.sampled_from(["a", "b", "", "$SYS", "dev-1", "telemetry"])
_FILTER_LEVEL = st.sampled_from(["a", "b", "", "$SYS", "+", "#", "a#", "dev-1"])
TOPICS = st.lists(_TOPIC_LEVEL, min_size=1, max_size=4).map("/".join)
FILTERS = st.lists(_FILTER_LEVEL, min_size=1, max_size=4).map("/".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(FILTERS, max_size=6), st.lists(TOPICS, min_size=1, max_size=6))
def test_matches_as_topic_matches_does_over_every_filter(
    filters: list[str], topics: list[str]
) -> None:
    index = FilterIndex()
    for topic_filter in filters:
        index.add(topic_filter)
    for topic in topics:
        expected = any(topic_matches(topic, f) for f in filters)
        assert index.matches(topic) is expected, (topic, filters)


@settings(max_examples=200, deadline=None)
@given(st.lists(FILTERS, min_size=1, max_size=6), st.data())
def test_removing_what_was_added_leaves_what_remains(
    filters: list[str], data: st.DataObject
) -> None:
    index = FilterIndex()
    for topic_filter in filters:
        index.add(topic_filter)
    removed = data.draw(st.lists(st.sampled_from(filters), unique=True))
    remaining = list(filters)
    for topic_filter in removed:
        index.remove(topic_filter)
        remaining.remove(topic_filter)
    for topic in data.draw(st.lists(TOPICS, min_size=1, max_size=6)):
        assert index.matches(topic) is any(topic_matches(topic, f) for f in remaining)


def test_two_owners_of_one_filter_are_counted_apart() -> None:
    index = FilterIndex()
    index.add("devices/+/cert/issued")
    index.add("devices/+/cert/issued")
    index.remove("devices/+/cert/issued")
    assert index.matches("devices/d1/cert/issued")
    index.remove("devices/+/cert/issued")
    assert not index.matches("devices/d1/cert/issued")
    index.remove("never/added")  # ignored, not an error
    assert len(index) == 0


def test_session_records_give_their_qos1_filters_only() -> None:
    record = b'{"key": "k", "filters": {"a/#": 1, "b/+": 0, "c": 2}}'
    assert stored_filters(record) == {"a/#", "c"}
    assert stored_filters(b"not json") == frozenset()
    assert stored_filters(None) == frozenset()


def test_store_interest_says_store_until_ready_and_follows_records() -> None:
    interest = StoreInterest()
    assert interest.needs_store("anything")  # the bucket is not known yet: store
    interest._ready = True  # what the watch sets once it delivered the bucket's contents
    assert not interest.needs_store("fleet/x")
    interest.apply("k1", b'{"filters": {"fleet/#": 1}}', revision=2)
    assert interest.needs_store("fleet/x")
    interest.apply("k1", b'{"filters": {}}', revision=1)  # an older revision: ignored
    assert interest.needs_store("fleet/x")
    interest.apply("k1", None, revision=3)  # deleted
    assert not interest.needs_store("fleet/x")


def test_store_interest_forgets_records_not_written_again_within_the_expiry() -> None:
    interest = StoreInterest(forget_after_s=60)
    interest._ready = True
    interest.apply("old", b'{"filters": {"a/#": 1}}', revision=1, written_at=1000.0)
    interest.apply("kept", b'{"filters": {"b/#": 1}}', revision=1, written_at=1050.0)
    assert interest.forget_stale(now=1070.0) == 1  # "old" was written 70 s ago
    assert not interest.needs_store("a/x")
    assert interest.needs_store("b/x")
    interest.apply("kept", b'{"filters": {"b/#": 1}}', revision=2, written_at=1100.0)
    assert interest.forget_stale(now=1130.0) == 0  # rewritten (a connected session)
    assert interest.needs_store("b/x")
