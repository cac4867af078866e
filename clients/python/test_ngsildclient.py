"""Borough driven by Orange's ngsildclient (PyPI, pinned by scripts/test-clients.sh).

Every test goes through the client's own API (Client, Entity, the batch,
query, pagination, temporal and subscription helpers) against a running
Borough whose root URL is in BOROUGH_URL (for example http://127.0.0.1:1026).
The few requests that ngsildclient 0.5.2 has no helper for (attribute
discovery) are sent through the client's own HTTP session, so they carry the
same headers as everything else it sends.

The whole module works in a tenant of its own, named after a random run id,
so it neither sees nor disturbs other suites, and can be run twice against
the same server. The assertions are those of ETSI GS CIM 009 (NGSI-LD).
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import urlsplit

import pytest
import requests

from ngsildclient import Client, Entity, SubscriptionBuilder
from ngsildclient.api.exceptions import (
    NgsiAlreadyExistsError,
    NgsiResourceNotFoundError,
)
from ngsildclient.api.helper.temporal import TemporalQuery

BOROUGH_URL = os.environ.get("BOROUGH_URL", "http://127.0.0.1:1026")
RUN = uuid.uuid4().hex[:8]
TENANT = f"ngsildclient-{RUN}"

# Two Paris landmarks 2.7 km apart and one in Rome; coordinates are (lat, lon)
# as ngsildclient's Entity.loc() takes them.
EIFFEL = (48.8584, 2.2945)
MONTPARNASSE = (48.8421, 2.3219)
COLOSSEUM = (41.8902, 12.4922)


def _ts(value: str) -> datetime:
    """An NGSI-LD DateTime as an aware datetime (any fraction of seconds)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class _Bearer(requests.auth.AuthBase):
    """The API key Borough's access control asks for (BOROUGH_API_KEY)."""

    def __init__(self, key):
        self.key = key

    def __call__(self, r):
        r.headers["Authorization"] = f"Bearer {self.key}"
        return r


API_KEY = os.environ.get("BOROUGH_API_KEY")


@pytest.fixture(scope="module")
def client():
    url = urlsplit(BOROUGH_URL)
    c = Client(
        hostname=url.hostname,
        port=url.port or 80,
        tenant=TENANT,
        verbose=False,
        custom_auth=_Bearer(API_KEY) if API_KEY else None,
    )
    yield c
    c.close()


@pytest.fixture(scope="module")
def monuments(client):
    """Three monuments, created once for the query, geo and discovery tests."""
    eiffel = (
        Entity("Monument", f"eiffel-{RUN}")
        .prop("name", "Eiffel Tower")
        .prop("city", "Paris")
        .prop("height", 330, unitcode="MTR")
        .loc(*EIFFEL)
    )
    montparnasse = (
        Entity("Monument", f"montparnasse-{RUN}")
        .prop("name", "Tour Montparnasse")
        .prop("city", "Paris")
        .prop("height", 210, unitcode="MTR")
        .loc(*MONTPARNASSE)
    )
    colosseum = (
        Entity("Monument", f"colosseum-{RUN}")
        .prop("name", "Colosseum")
        .prop("city", "Rome")
        .prop("height", 48, unitcode="MTR")
        .loc(*COLOSSEUM)
    )
    result = client.create([eiffel, montparnasse, colosseum])
    assert result.ok, result.errors
    return {"eiffel": eiffel, "montparnasse": montparnasse, "colosseum": colosseum}


def ids(entities) -> list[str]:
    return sorted(e.id for e in entities)


# --- single entities ---------------------------------------------------------


def test_create_then_get_returns_what_was_written(client):
    e = (
        Entity("Landmark", f"create-{RUN}")
        .prop("name", "Arc de Triomphe")
        .prop("height", 50, unitcode="MTR", observedat="2026-01-05T08:00:00Z")
        .rel("locatedIn", "City:Paris")
        .loc(48.8738, 2.2950)
    )
    assert client.create(e) is True

    got = client.get(e.id)
    assert got.id == f"urn:ngsi-ld:Landmark:create-{RUN}"
    assert got.type == "Landmark"
    assert got["name"]["type"] == "Property"
    assert got["name"]["value"] == "Arc de Triomphe"
    assert got["height"]["value"] == 50
    assert got["height"]["unitCode"] == "MTR"
    assert _ts(got["height"]["observedAt"]) == datetime(2026, 1, 5, 8, tzinfo=timezone.utc)
    assert got["locatedIn"]["type"] == "Relationship"
    assert got["locatedIn"]["object"] == "urn:ngsi-ld:City:Paris"
    assert got["location"]["type"] == "GeoProperty"
    assert got["location"]["value"] == {"type": "Point", "coordinates": [2.295, 48.8738]}
    # ngsildclient's exists() asks for application/ld+json and expects the
    # @context in the body, as the spec requires for that media type.
    assert client.exists(e.id) is True


def test_create_twice_is_already_exists(client):
    e = Entity("Landmark", f"twice-{RUN}").prop("name", "Pont Neuf")
    assert client.create(e) is True
    with pytest.raises(NgsiAlreadyExistsError):
        client.create(e)


def test_get_unknown_entity_is_resource_not_found(client, monuments):
    with pytest.raises(NgsiResourceNotFoundError):
        client.get(f"urn:ngsi-ld:Landmark:nowhere-{RUN}")
    assert client.exists(f"urn:ngsi-ld:Landmark:nowhere-{RUN}") is False


def test_upsert_and_update_single_entity(client):
    e = Entity("Landmark", f"upsert-{RUN}").prop("name", "Louvre").prop("visitors", 100)
    # upsert of a new entity creates it
    assert client.upsert(e) is True
    assert client.get(e.id)["visitors"]["value"] == 100

    # upsert of an existing one replaces it (ngsildclient: create, 409, delete, create)
    e2 = Entity("Landmark", f"upsert-{RUN}").prop("name", "Musée du Louvre").prop("open", True)
    assert client.upsert(e2) is True
    got = client.get(e.id)
    assert got["name"]["value"] == "Musée du Louvre"
    assert got["open"]["value"] is True
    assert "visitors" not in got.to_dict()

    # update() changes an existing entity ...
    e3 = Entity("Landmark", f"upsert-{RUN}").prop("name", "Louvre").prop("visitors", 250)
    assert client.update(e3) is True
    got = client.get(e.id)
    assert got["visitors"]["value"] == 250
    assert got["name"]["value"] == "Louvre"
    # ... and leaves a missing one missing
    assert client.update(Entity("Landmark", f"missing-{RUN}").prop("a", 1)) is False
    assert client.exists(f"urn:ngsi-ld:Landmark:missing-{RUN}") is False

    # delete() removes it
    assert client.delete(e) is True
    assert client.exists(e.id) is False


# --- batch operations --------------------------------------------------------


def test_batch_create_upsert_update_delete(client):
    bins = [Entity("WasteBin", f"bin{i}-{RUN}").prop("fillingLevel", i / 10) for i in range(5)]
    created = client.create(bins)
    assert created.ok, created.errors
    assert sorted(created.success) == ids(bins)

    # one already there, one new: 207 with one error naming the duplicate
    partial = client.batch.create([bins[0], Entity("WasteBin", f"bin5-{RUN}").prop("fillingLevel", 0.5)])
    assert partial.n_ok == 1 and partial.n_err == 1, partial
    assert partial.success == [f"urn:ngsi-ld:WasteBin:bin5-{RUN}"]
    assert partial.errors[0]["entityId"] == bins[0].id
    bins.append(Entity("WasteBin", f"bin5-{RUN}").prop("fillingLevel", 0.5))

    # upsert with options=update: existing attributes updated, others kept
    for b in bins:
        b["fillingLevel"]["value"] = 0.9
    bins[0].prop("status", "full")
    up = client.upsert(bins, update=True)
    assert up.ok, up.errors
    assert sorted(up.success) == ids(bins)
    got = client.get(bins[0].id)
    assert got["fillingLevel"]["value"] == 0.9
    assert got["status"]["value"] == "full"

    # upsert with options=replace (the default): the entity becomes exactly the new one
    replaced = Entity("WasteBin", f"bin0-{RUN}").prop("fillingLevel", 0.0)
    rep = client.upsert([replaced])
    assert rep.ok, rep.errors
    got = client.get(bins[0].id)
    assert got["fillingLevel"]["value"] == 0.0
    assert "status" not in got.to_dict()

    # batch update with noOverwrite: existing values stay, new attributes are
    # added, and the attribute left as it was is reported (207)
    noover = Entity("WasteBin", f"bin1-{RUN}").prop("fillingLevel", 0.1).prop("colour", "green")
    upd = client.update([noover], overwrite=False)
    assert not upd.ok
    assert [e["entityId"] for e in upd.errors] == [noover.id]
    assert "fillingLevel" in upd.errors[0]["error"]["detail"]
    got = client.get(bins[1].id)
    assert got["fillingLevel"]["value"] == 0.9
    assert got["colour"]["value"] == "green"

    assert client.count(type="WasteBin") == 6

    deleted = client.delete(bins)
    assert deleted.ok, deleted.errors
    assert sorted(deleted.success) == ids(bins)
    assert client.count(type="WasteBin") == 0
    with pytest.raises(NgsiResourceNotFoundError):
        client.get(bins[3].id)


# --- queries -----------------------------------------------------------------


def test_query_by_type(client, monuments):
    found = client.query(type="Monument")
    assert ids(found) == ids(monuments.values())
    eiffel = next(e for e in found if e.id == monuments["eiffel"].id)
    assert eiffel["name"]["value"] == "Eiffel Tower"
    assert eiffel["height"]["unitCode"] == "MTR"
    assert client.count(type="Monument") == 3


def test_query_q_string_with_spaces(client, monuments):
    found = client.query(type="Monument", q='name=="Eiffel Tower"')
    assert ids(found) == [monuments["eiffel"].id]
    assert client.count(type="Monument", q='name=="Eiffel Tower"') == 1
    # no type, q alone
    assert ids(client.query(q='name=="Tour Montparnasse"')) == [monuments["montparnasse"].id]


def test_query_q_numbers_and_conjunctions(client, monuments):
    assert ids(client.query(type="Monument", q="height>200")) == sorted(
        [monuments["eiffel"].id, monuments["montparnasse"].id]
    )
    assert ids(client.query(type="Monument", q='city=="Paris";height<300')) == [monuments["montparnasse"].id]
    assert ids(client.query(type="Monument", q='city=="Rome"|height==330')) == sorted(
        [monuments["eiffel"].id, monuments["colosseum"].id]
    )
    assert client.count(type="Monument", q="height>=48") == 3
    assert client.query(type="Monument", q='name=="Big Ben"') == []


def test_geo_query(client, monuments):
    # ngsildclient's gq= argument of query() is sent as a non-standard `geoQ`
    # URL parameter; its standard way to send a geo-query is the POST query
    # (client.alt), whose Query body carries a geoQ as the spec defines it.
    def near(meters: int) -> dict:
        return {
            "type": "Query",
            "entities": [{"type": "Monument"}],
            "geoQ": {
                "geometry": "Point",
                "coordinates": [EIFFEL[1], EIFFEL[0]],
                "georel": f"near;maxDistance=={meters}",
            },
        }

    assert ids(client.alt.query(near(2000))) == [monuments["eiffel"].id]
    assert ids(client.alt.query(near(5000))) == sorted([monuments["eiffel"].id, monuments["montparnasse"].id])
    assert client.alt.count(near(5000)) == 2

    around_paris = {
        "type": "Query",
        "entities": [{"type": "Monument"}],
        "geoQ": {
            "geometry": "Polygon",
            "coordinates": [[[2.2, 48.8], [2.45, 48.8], [2.45, 48.92], [2.2, 48.92], [2.2, 48.8]]],
            "georel": "within",
        },
        "q": "height<300",
    }
    assert ids(client.alt.query(around_paris)) == [monuments["montparnasse"].id]


# --- pagination --------------------------------------------------------------


def test_pagination_helpers_over_several_pages(client):
    counters = [Entity("TrafficCounter", f"c{i:02d}-{RUN}").prop("lane", i) for i in range(25)]
    assert client.create(counters).ok
    expected = ids(counters)

    assert client.count(type="TrafficCounter") == 25

    # query(): count first, then pages of `limit` with offset
    paged = client.query(type="TrafficCounter", limit=10)
    assert len(paged) == 25
    assert ids(paged) == expected

    generated = list(client.query_generator(type="TrafficCounter", limit=7))
    assert ids(generated) == expected
    pages = list(client.query_generator(type="TrafficCounter", limit=10, batch=True))
    assert [len(p) for p in pages] == [10, 10, 5]

    seen: list[str] = []
    client.query_handle(type="TrafficCounter", limit=9, callback=lambda e: seen.append(e.id))
    assert sorted(seen) == expected

    head = client.query_head(type="TrafficCounter", n=5)
    assert len(head) == 5

    q_paged = client.query(type="TrafficCounter", q="lane>=20", limit=2)
    assert sorted(e["lane"]["value"] for e in q_paged) == [20, 21, 22, 23, 24]

    alt = client.alt.query({"type": "Query", "entities": [{"type": "TrafficCounter"}]}, limit=10)
    assert ids(alt) == expected

    # drop(): query_generator in batches, then batch delete
    client.drop("TrafficCounter")
    assert client.count(type="TrafficCounter") == 0


# --- temporal ----------------------------------------------------------------


TEMPS = [
    (20.5, "2026-01-10T10:00:00Z"),
    (21.0, "2026-01-10T10:15:00Z"),
    (22.25, "2026-01-10T10:30:00Z"),
    (19.75, "2026-01-10T10:45:00Z"),
]


def _temps(troe: dict) -> list[tuple[float, datetime]]:
    values = troe["temperature"]["values"]
    return sorted(((v, _ts(t)) for v, t in values), key=lambda x: x[1])


@pytest.fixture(scope="module")
def sensor(client):
    """A sensor whose temperature was written four times with observedAt."""
    value, at = TEMPS[0]
    e = Entity("TempSensor", f"s1-{RUN}").prop("temperature", value, observedat=at, unitcode="CEL")
    assert client.create(e) is True
    for value, at in TEMPS[1:]:
        change = Entity("TempSensor", f"s1-{RUN}").prop("temperature", value, observedat=at, unitcode="CEL")
        res = client.batch.update([change])
        assert res.ok, res.errors
    return e


def test_entity_keeps_latest_written_value(client, sensor):
    got = client.get(sensor.id)
    assert got["temperature"]["value"] == TEMPS[-1][0]
    assert _ts(got["temperature"]["observedAt"]) == _ts(TEMPS[-1][1])


def test_temporal_get_simplified(client, sensor):
    troe = client.temporal.get(sensor.id, attrs=["temperature"])
    assert troe["id"] == sensor.id
    assert troe["type"] == "TempSensor"
    assert _temps(troe) == [(v, _ts(t)) for v, t in TEMPS]


def test_temporal_get_normalized(client, sensor):
    troe = client.temporal.get(sensor.id, attrs=["temperature"], verbose=True)
    instances = troe["temperature"]
    assert isinstance(instances, list)
    got = sorted(((i["value"], _ts(i["observedAt"])) for i in instances), key=lambda x: x[1])
    assert got == [(v, _ts(t)) for v, t in TEMPS]
    assert all(i.get("unitCode") == "CEL" for i in instances)


def test_temporal_query_with_time_window(client, sensor):
    # Temporal.query() always sends options=count,temporalValues (count as an
    # option value, where GS CIM 009 1.8 has a count=true parameter).
    tq = TemporalQuery().between("2026-01-10T10:10:00Z", "2026-01-10T10:40:00Z")
    troes = client.temporal.query(type="TempSensor", attrs=["temperature"], tq=tq)
    assert [t["id"] for t in troes] == [sensor.id]
    assert _temps(troes[0]) == [(v, _ts(t)) for v, t in TEMPS[1:3]]

    after = TemporalQuery().after("2026-01-10T10:20:00Z")
    troes = client.temporal.query(eid=sensor.id, attrs=["temperature"], tq=after)
    assert _temps(troes[0]) == [(v, _ts(t)) for v, t in TEMPS[2:]]

    last = client.temporal.query(
        type="TempSensor", attrs=["temperature"], tq=TemporalQuery().before("2026-02-01T00:00:00Z"), lastn=2
    )
    assert _temps(last[0]) == [(v, _ts(t)) for v, t in TEMPS[2:]]


# --- subscriptions -----------------------------------------------------------


def _eiffel_subscription(builder: SubscriptionBuilder, description: str, etype: str = "Monument") -> dict:
    return (
        builder.description(description)
        .select_type(etype)
        .watch(["name"])
        .query('name=="Eiffel Tower"')
        .notif(["name", "height"])
        .build()
    )


def test_subscription_create_list_get_delete(client):
    tag = f"plain-{RUN}"
    subscr = _eiffel_subscription(SubscriptionBuilder("http://127.0.0.1:9/notify"), f"the Eiffel Tower's name ({tag})")
    # SubscriptionBuilder.query() percent-encodes q in the body
    assert subscr["q"] == "name%3D%3D%22Eiffel%20Tower%22"

    sid = client.subscriptions.create(subscr)
    assert sid

    listed = client.subscriptions.list()
    assert sid in [s["id"] for s in listed]
    # list(pattern) filters on the name and description the broker returns
    mine = client.subscriptions.list(pattern=tag)
    assert [s["id"] for s in mine] == [sid]

    got = client.subscriptions.get(sid)
    assert got["id"] == sid
    assert got["type"] == "Subscription"
    assert got["description"] == f"the Eiffel Tower's name ({tag})"
    assert got["entities"] == [{"type": "Monument"}]
    assert got["watchedAttributes"] == ["name"]
    assert got["isActive"] is True
    assert sorted(got["notification"]["attributes"]) == ["height", "name"]
    assert got["notification"]["format"] == "normalized"
    assert got["notification"]["endpoint"]["uri"] == "http://127.0.0.1:9/notify"
    assert got["notification"]["endpoint"]["accept"] == "application/ld+json"
    assert client.subscriptions.exists(sid) is True

    # delete(pattern) deletes every listed subscription matching the pattern
    assert client.subscriptions.delete(tag) is True
    with pytest.raises(NgsiResourceNotFoundError):
        client.subscriptions.get(sid)
    assert client.subscriptions.exists(sid) is False
    assert client.subscriptions.list(pattern=tag) == []

    # the q comes back decoded: the query the subscription actually runs
    assert got["q"] == 'name=="Eiffel Tower"'


def test_subscription_with_builder_name(client):
    """SubscriptionBuilder.name() sends the member `name` (NGSI-LD 1.3's
    name of what later versions call `subscriptionName`)."""
    tag = f"named-{RUN}"
    subscr = _eiffel_subscription(SubscriptionBuilder("http://127.0.0.1:9/named").name(tag), "named")
    assert subscr["name"] == tag
    sid = client.subscriptions.create(subscr)
    assert sid
    got = client.subscriptions.get(sid)
    assert got["id"] == sid
    assert tag in (got.get("subscriptionName"), got.get("name"))
    assert [s["id"] for s in client.subscriptions.list(pattern=tag)] == [sid]
    assert client.subscriptions.delete(tag) is True
    assert client.subscriptions.exists(sid) is False


class _Receiver:
    """A notification endpoint on loopback that keeps what it is sent."""

    def __init__(self):
        received = self.received = []
        arrived = self.arrived = threading.Condition()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(204)
                self.end_headers()
                with arrived:
                    received.append(json.loads(body))
                    arrived.notify_all()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while not predicate(self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.arrived.wait(left)
            return True

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_subscription_with_encoded_q_notifies_matching_entities_only(client):
    """The percent-encoded q that SubscriptionBuilder.query() writes must
    select the same entities as the plain one."""
    receiver = _Receiver()
    try:
        subscr = _eiffel_subscription(SubscriptionBuilder(receiver.url), f"notify ({RUN})", etype="ViewingTower")
        sid = client.subscriptions.create(subscr)
        assert sid

        other = Entity("ViewingTower", f"bigben-{RUN}").prop("name", "Big Ben").prop("height", 96)
        match = Entity("ViewingTower", f"eiffel2-{RUN}").prop("name", "Eiffel Tower").prop("height", 330)
        assert client.create(other) is True
        assert client.create(match) is True

        def ids_notified(received):
            return [d["id"] for n in received for d in n.get("data", [])]

        assert receiver.wait_for(lambda r: match.id in ids_notified(r)), receiver.received
        # one endpoint's notifications go out in order: Big Ben's would be first
        assert other.id not in ids_notified(receiver.received)
        note = next(n for n in receiver.received if match.id in ids_notified([n]))
        assert note["type"] == "Notification"
        assert note["subscriptionId"] == sid
        data = next(d for d in note["data"] if d["id"] == match.id)
        assert data["name"]["value"] == "Eiffel Tower"
        assert data["height"]["value"] == 330
        assert client.subscriptions.delete(f"notify \\({RUN}\\)") is True
    finally:
        receiver.close()


# --- discovery ---------------------------------------------------------------


def test_types_list(client, monuments, sensor):
    types = client.types.list()
    assert "Monument" in types
    assert "TempSensor" in types


def test_attributes_discovery(client, monuments):
    # ngsildclient 0.5.2 has no helper for /attributes and /types/{type}
    base = f"{client.url}/ngsi-ld/v1"
    r = client.session.get(f"{base}/attributes", headers={"Content-Type": None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "AttributeList"
    for attr in ("name", "city", "height", "location"):
        assert attr in body["attributeList"]

    r = client.session.get(f"{base}/types/Monument", headers={"Content-Type": None})
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["type"] == "EntityTypeInfo"
    assert info["typeName"] == "Monument"
    assert info["entityCount"] == 3
    names = {d["attributeName"] for d in info["attributeDetails"]}
    assert {"name", "city", "height", "location"} <= names
