// Borough as the context broker of a real FIWARE IoT Agent: the iotagent-node-lib
// library (npm, pinned in package-lock.json) in NGSI-LD mode, with its in-memory
// device registry (no MongoDB), and the local Mosquitto (127.0.0.1:1883, or
// MQTT_URL) as the devices' MQTT broker, with node's own test runner.
//
// The path of a command, as with Orion-LD:
//   the agent provisions a device with a command `switch`: it POSTs a context source
//   registration (exclusive, updateOps) for the entity's `switch` to Borough;
//   a user PATCHes `switch` on Borough; Borough forwards the PATCH to the agent's
//   providerUrl; the agent's command handler publishes the command over MQTT on
//   /<apikey>/<deviceid>/cmd (the iotagent-json topic); the device answers on
//   /<apikey>/<deviceid>/cmdexe; the agent reports the result through the library
//   (setCommandResult), which upserts `switch_status`/`switch_info` on Borough.
//
// BOROUGH_URL is the server's root (e.g. http://127.0.0.1:1026). BOROUGH_TOKEN (or
// BOROUGH_API_KEY) is sent as `Authorization: Bearer` by the test and by the agent
// (the library's oauth2 mode with a permanent token). Borough must be allowed to
// call loopback addresses (`--allow-outbound loopback`). Each run uses its own
// tenant, apikey and device, so runs do not see one another. The test never
// leaves the machine: the agent listens on 127.0.0.1 and uses the core @context,
// which a broker knows without fetching it.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { randomBytes } from "node:crypto";
import http from "node:http";
import https from "node:https";
import net from "node:net";

const require = createRequire(import.meta.url);
const iota = require("iotagent-node-lib");
const mqtt = require("mqtt");

const BASE = (process.env.BOROUGH_URL ?? "http://127.0.0.1:1026").replace(/\/+$/, "");
const TOKEN = process.env.BOROUGH_TOKEN || process.env.BOROUGH_API_KEY || "";
const MQTT_URL = process.env.MQTT_URL ?? "mqtt://127.0.0.1:1883";
const CORE = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld";

const RUN = randomBytes(4).toString("hex");
const TENANT = `iotagent-${RUN}`;
const APIKEY = `key${RUN}`;
const DEVICE_ID = `streetlight-${RUN}`;
const TYPE = "Streetlight";
const ENTITY = `urn:ngsi-ld:${TYPE}:${RUN}`;
const CMD_TOPIC = `/${APIKEY}/${DEVICE_ID}/cmd`;
const CMDEXE_TOPIC = `/${APIKEY}/${DEVICE_ID}/cmdexe`;

const STEP_MS = 20_000; // every test
const HTTP_MS = 10_000; // every HTTP call
const WAIT_MS = 10_000; // every poll

let providerUrl;
let agentUp = false;
let registered = false; // the agent holds a registration on Borough
let entityMade = false; // Borough has the device's entity
let agentMqtt; // the agent's southbound MQTT client
let deviceMqtt; // the device
const deviceReceived = []; // {topic, payload} the device got
const handlerCalls = []; // the command handler's arguments

// --- helpers -----------------------------------------------------------------

function withTimeout(promise, ms, what) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// A node-style call of the library, as a promise with a deadline.
function call(what, fn, ...args) {
    return withTimeout(
        new Promise((resolve, reject) => fn(...args, (err, result) => (err ? reject(err) : resolve(result)))),
        HTTP_MS,
        what,
    );
}

async function borough(method, path, { body, headers = {} } = {}) {
    const h = { "NGSILD-Tenant": TENANT, Accept: "application/json", ...headers };
    if (TOKEN) h.Authorization = `Bearer ${TOKEN}`;
    if (body !== undefined) h["Content-Type"] ??= "application/json";
    const res = await fetch(BASE + path, {
        method,
        headers: h,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(HTTP_MS),
    });
    const text = await res.text();
    let json;
    try {
        json = text ? JSON.parse(text) : undefined;
    } catch {
        json = undefined;
    }
    return { status: res.status, headers: res.headers, text, json };
}

async function waitFor(what, probe, ms = WAIT_MS) {
    const deadline = Date.now() + ms;
    let last;
    for (;;) {
        last = await probe();
        if (last.ok) return last.value;
        if (Date.now() > deadline) assert.fail(`${what}: not within ${ms} ms (last seen: ${last.seen})`);
        await new Promise((r) => setTimeout(r, 100));
    }
}

function freePort() {
    return new Promise((resolve, reject) => {
        const s = net.createServer();
        s.once("error", reject);
        s.listen(0, "127.0.0.1", () => {
            const { port } = s.address();
            s.close(() => resolve(port));
        });
    });
}

function mqttConnect(name) {
    const client = mqtt.connect(MQTT_URL, {
        clientId: `${name}-${RUN}`,
        connectTimeout: 5_000,
        reconnectPeriod: 0,
        clean: true,
    });
    return withTimeout(
        new Promise((resolve, reject) => {
            client.once("connect", () => resolve(client));
            client.once("error", reject);
        }),
        6_000,
        `MQTT connect to ${MQTT_URL}`,
    ).catch((e) => {
        client.end(true);
        throw e;
    });
}

function registrationsFor(list) {
    return (Array.isArray(list) ? list : []).filter((reg) =>
        (reg.information ?? []).some((info) => (info.entities ?? []).some((e) => e.id === ENTITY)),
    );
}

async function listRegistrations() {
    const res = await borough("GET", `/ngsi-ld/v1/csourceRegistrations?type=${TYPE}`);
    assert.equal(res.status, 200, `GET csourceRegistrations: ${res.status} ${res.text}`);
    assert.ok(Array.isArray(res.json), `GET csourceRegistrations answers an array: ${res.text}`);
    return registrationsFor(res.json);
}

async function entityAttr(name) {
    const res = await borough("GET", `/ngsi-ld/v1/entities/${encodeURIComponent(ENTITY)}`);
    const attr = res.status === 200 ? res.json?.[name] : undefined;
    const value = Array.isArray(attr) ? attr[0]?.value : attr?.value;
    return { status: res.status, value, entity: res.json, text: res.text };
}

// --- the agent and the device ------------------------------------------------

before(async () => {
    const port = await freePort();
    providerUrl = `http://127.0.0.1:${port}`;

    // The device: records the commands it gets and acknowledges each on cmdexe,
    // as an iotagent-json device does ({"<command>": "<result>"}).
    deviceMqtt = await mqttConnect("device");
    deviceMqtt.on("message", (topic, payload) => {
        const text = payload.toString();
        deviceReceived.push({ topic, payload: text });
        let cmd;
        try {
            cmd = JSON.parse(text);
        } catch {
            return;
        }
        const result = Object.fromEntries(Object.entries(cmd).map(([k, v]) => [k, `${k} ${v} done`]));
        deviceMqtt.publish(CMDEXE_TOPIC, JSON.stringify(result));
    });
    await call("device subscribe", deviceMqtt.subscribe.bind(deviceMqtt), CMD_TOPIC, { qos: 1 });

    // The agent's southbound side: a command result from the device becomes the
    // command's status and info on the broker, through the library.
    agentMqtt = await mqttConnect("agent");
    agentMqtt.on("message", (topic, payload) => {
        if (topic !== CMDEXE_TOPIC) return;
        let results;
        try {
            results = JSON.parse(payload.toString());
        } catch {
            return;
        }
        iota.getDeviceByName(ENTITY, TENANT, "/", (err, device) => {
            if (err) return;
            for (const [name, result] of Object.entries(results)) {
                iota.setCommandResult(ENTITY, TYPE, APIKEY, name, String(result), "OK", device, () => {});
            }
        });
    });
    await call("agent subscribe", agentMqtt.subscribe.bind(agentMqtt), CMDEXE_TOPIC, { qos: 1 });

    const config = {
        logLevel: process.env.IOTA_TEST_LOG_LEVEL ?? "FATAL",
        timestamp: true,
        contextBroker: { url: BASE, ngsiVersion: "ld", jsonLdContext: CORE },
        server: { port, host: "127.0.0.1" },
        deviceRegistry: { type: "memory" },
        types: { [TYPE]: TOKEN ? { trust: TOKEN } : {} },
        service: TENANT,
        subservice: "/",
        providerUrl,
    };
    if (TOKEN) {
        // The library's only way to a static bearer token: oauth2 with a permanent
        // token, taken from the type's (or group's or device's) `trust`. The oauth2
        // fields are mandatory but unused then.
        config.authentication = {
            enabled: true,
            type: "oauth2",
            header: "Authorization",
            permanentToken: true,
            url: "http://127.0.0.1:9",
            tokenPath: "/unused",
            clientId: "unused",
            clientSecret: "unused",
        };
    }
    await call("iota.activate", iota.activate, config);
    agentUp = true;

    // Like iotagent-json's MQTT binding: a command is published to the device, and
    // the update answered once it is sent; the result comes later from cmdexe.
    iota.setCommandHandler((id, type, service, subservice, attributes, callback) => {
        handlerCalls.push({ id, type, service, subservice, attributes });
        iota.getDeviceByName(id, service, subservice, (err, device) => {
            if (err) return callback(err);
            const payload = Object.fromEntries(attributes.map((a) => [a.name, a.value]));
            agentMqtt.publish(`/${device.apikey}/${device.id}/cmd`, JSON.stringify(payload), { qos: 1 }, (e) =>
                callback(e ?? null),
            );
        });
    });
});

after(async () => {
    const quietly = (p) => p.catch(() => {});
    if (agentUp && registered) {
        await quietly(call("iota.unregister", iota.unregister, DEVICE_ID, APIKEY, TENANT, "/"));
    }
    if (agentUp) {
        await quietly(withTimeout(new Promise((r) => iota.deactivate(() => r())), 5_000, "iota.deactivate"));
    }
    await Promise.all(
        [agentMqtt, deviceMqtt].filter(Boolean).map((c) => quietly(withTimeout(c.endAsync(true), 3_000, "mqtt end"))),
    );
    // The library's HTTP client (got) keeps connections to Borough alive.
    http.globalAgent.destroy();
    https.globalAgent.destroy();
});

// --- the tests ---------------------------------------------------------------

test("provisioning a device with a command registers it on Borough", { timeout: STEP_MS }, async () => {
    const device = await call("iota.register", iota.register, {
        id: DEVICE_ID,
        name: ENTITY,
        type: TYPE,
        service: TENANT,
        subservice: "/",
        apikey: APIKEY,
        protocol: "IoTA-JSON",
        transport: "MQTT",
        commands: [{ name: "switch", type: "command" }],
        active: [{ name: "powerState", object_id: "p", type: "Text" }],
    });
    registered = true;
    // The library keeps the id it read from the answer's Location header.
    assert.ok(device.registrationId, "the agent kept the registration id from Location");

    const regs = await listRegistrations();
    assert.equal(regs.length, 1, `one registration for ${ENTITY}: ${JSON.stringify(regs)}`);
    const reg = regs[0];
    assert.equal(reg.id.split("/").pop(), device.registrationId);
    assert.equal(reg.type, "ContextSourceRegistration");
    assert.equal(reg.endpoint, providerUrl);
    assert.equal(reg.mode, "exclusive");
    assert.ok(reg.operations?.includes("updateOps"), `operations: ${JSON.stringify(reg.operations)}`);
    const info = reg.information.find((i) => i.entities?.some((e) => e.id === ENTITY));
    assert.deepEqual(
        info.entities.find((e) => e.id === ENTITY),
        { id: ENTITY, type: TYPE },
    );
    assert.deepEqual(info.propertyNames, ["switch"]);

    const one = await borough("GET", `/ngsi-ld/v1/csourceRegistrations/${encodeURIComponent(reg.id)}`);
    assert.equal(one.status, 200, one.text);
    assert.equal(one.json.endpoint, providerUrl);
});

// A step whose precondition failed is skipped: the first failure is the one to read.
const needs = (t, ok, what) => (ok ? false : (t.skip(`needs ${what}`), true));

test("a measurement from the device creates the entity on Borough", { timeout: STEP_MS }, async (t) => {
    if (needs(t, registered, "the provisioned device")) return;
    const device = await call("iota.getDeviceByName", iota.getDeviceByName, ENTITY, TENANT, "/");
    await call("iota.update", iota.update, ENTITY, TYPE, APIKEY, [{ name: "powerState", type: "Text", value: "off" }], device);
    const got = await entityAttr("powerState");
    assert.equal(got.status, 200, got.text);
    assert.equal(got.entity.type, TYPE);
    assert.equal(got.value, "off");
    entityMade = true;
});

test("PATCH .../attrs/switch on Borough reaches the device over MQTT and its result comes back", { timeout: STEP_MS }, async (t) => {
    if (needs(t, registered && entityMade, "the registered device and its entity")) return;
    const calls = handlerCalls.length;
    const received = deviceReceived.length;
    const res = await borough("PATCH", `/ngsi-ld/v1/entities/${encodeURIComponent(ENTITY)}/attrs/switch`, {
        body: { type: "Property", value: "on" },
    });
    assert.equal(res.status, 204, `PATCH attrs/switch: ${res.status} ${res.text}`);

    // Borough forwarded it to the agent, whose handler got the command.
    assert.equal(handlerCalls.length, calls + 1, "the agent's command handler ran once");
    const h = handlerCalls[calls];
    assert.equal(h.id, ENTITY);
    assert.equal(h.type, TYPE);
    assert.equal(h.service, TENANT);
    assert.deepEqual(
        h.attributes.map((a) => [a.name, a.value]),
        [["switch", "on"]],
    );

    const msg = await waitFor("the device's command", async () => {
        const m = deviceReceived.slice(received);
        return { ok: m.length > 0, value: m[0], seen: JSON.stringify(m) };
    });
    assert.equal(msg.topic, CMD_TOPIC);
    assert.deepEqual(JSON.parse(msg.payload), { switch: "on" });

    await waitFor("switch_status OK on Borough", async () => {
        const s = await entityAttr("switch_status");
        const i = await entityAttr("switch_info");
        return { ok: s.value === "OK" && i.value === "switch on done", seen: `${s.value} / ${i.value} (${s.text})` };
    });

    // The registration is exclusive: the command belongs to the agent, and
    // Borough keeps no copy of it.
    const local = await borough("GET", `/ngsi-ld/v1/entities/${encodeURIComponent(ENTITY)}?local=true`);
    assert.equal(local.status, 200, local.text);
    assert.equal(local.json.switch, undefined, `Borough stored the command itself: ${local.text}`);
    assert.equal(local.json.switch_status?.value, "OK");
});

test("PATCH .../attrs with switch on Borough reaches the device too", { timeout: STEP_MS }, async (t) => {
    if (needs(t, registered && entityMade, "the registered device and its entity")) return;
    const received = deviceReceived.length;
    const res = await borough("PATCH", `/ngsi-ld/v1/entities/${encodeURIComponent(ENTITY)}/attrs`, {
        body: { switch: { type: "Property", value: "off" } },
    });
    assert.equal(res.status, 204, `PATCH attrs: ${res.status} ${res.text}`);
    const msg = await waitFor("the device's command", async () => {
        const m = deviceReceived.slice(received);
        return { ok: m.length > 0, value: m[0], seen: JSON.stringify(m) };
    });
    assert.equal(msg.topic, CMD_TOPIC);
    assert.deepEqual(JSON.parse(msg.payload), { switch: "off" });
    await waitFor("switch_info of the second command on Borough", async () => {
        const i = await entityAttr("switch_info");
        return { ok: i.value === "switch off done", seen: `${i.value} (${i.text})` };
    });
    const s = await entityAttr("switch_status");
    assert.equal(s.value, "OK");
});

test("deprovisioning the device deletes its registration on Borough", { timeout: STEP_MS }, async (t) => {
    if (needs(t, registered, "the provisioned device")) return;
    await call("iota.unregister", iota.unregister, DEVICE_ID, APIKEY, TENANT, "/");
    registered = false;
    const regs = await listRegistrations();
    assert.deepEqual(regs, [], `no registration left for ${ENTITY}`);
});
