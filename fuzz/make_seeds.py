#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/seeds/<target>/.

The seeds are realistic messages (tests/fixtures, the example configuration) with the
selector bytes that `outpost::fuzzing` reads in front. `cargo fuzz run <t>
fuzz/corpus/<t> fuzz/seeds/<t>` starts from them; the minimised corpus that is kept
in the repository (fuzz/corpus/) already contains what they cover.
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "seeds")


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def fixture(name):
    with open(os.path.join(ROOT, "tests", "fixtures", name), "rb") as f:
        return f.read()


# --- TTN -----------------------------------------------------------------------------
ttn = fixture("ttn-uplink.json")
ttn_doc = json.loads(ttn)
write("ttn_uplink", "fixture", b"\x00" + ttn)
write("ttn_uplink", "fixture-mapped", bytes([1 << 5]) + ttn)
write("ttn_uplink", "fixture-allowlist-small", bytes([4 | 16]) + ttn)
write("ttn_uplink", "fixture-topic", b"\x02v3/bistro-cold-chain@ttn/devices/walkin-freezer-2/up\n" + ttn)
minimal = {
    "end_device_ids": {"device_id": "dev"},
    "received_at": "2024-05-01T12:00:00Z",
    "uplink_message": {"f_cnt": 7, "decoded_payload": {"temp": 215, "a": {"b": 1.5}, "ok": True}},
}
write("ttn_uplink", "minimal", bytes([3 << 5]) + json.dumps(minimal).encode())
sim = dict(ttn_doc, simulated=True)
write("ttn_uplink", "simulated-drop", b"\x08" + json.dumps(sim).encode())
write("ttn_uplink", "simulated-tag", b"\x00" + json.dumps(sim).encode())
nodev = json.loads(json.dumps(minimal))
nodev["end_device_ids"] = {"device_id": ""}
del nodev["received_at"]
nodev["uplink_message"]["received_at"] = "2024-05-01T12:00:00.123456789+02:00"
write("ttn_uplink", "device-from-topic", b"\x00" + json.dumps(nodev).encode())
join = {"end_device_ids": {"device_id": "dev"}, "join_accept": {"session_key_id": "x"}}
write("ttn_uplink", "join", b"\x01" + json.dumps(join).encode())

# --- ChirpStack ----------------------------------------------------------------------
cs = fixture("chirpstack-up.json")
cs_doc = json.loads(cs)
write("chirpstack_uplink", "fixture", b"\x00" + cs)
write("chirpstack_uplink", "fixture-deveui-allowlist", bytes([8 | 16 | (1 << 5)]) + cs)
write("chirpstack_uplink", "fixture-topic", b"\x02application/1f6a/device/a84041c2a1b2c3d4/event/up\n" + cs)
lean = {
    "deduplicationId": "d1",
    "deviceInfo": {"devEui": "0102030405060708"},
    "object": {"temp": 21.5, "nested": {"a": [1, 2, {"b": False}]}},
    "rxInfo": [{"gatewayId": "gw", "nsTime": "2024-05-01T12:00:00Z"}],
}
write("chirpstack_uplink", "lean-nstime", bytes([3 << 5]) + json.dumps(lean).encode())
write("chirpstack_uplink", "protobuf", b"\x00\x0a\x24" + b"7c1d2a9e-5b0f-4f3e-9a61-0d8e2b4c6f10" + b"\x12\x04\x0a\x02ab")
write("chirpstack_uplink", "join", b"\x01" + json.dumps({"deduplicationId": "d", "deviceInfo": {"deviceName": "x"}}).encode())

# --- Generic MQTT JSON ---------------------------------------------------------------
mqtt = [
    (0, "sensors/kitchen/json", {"temp": 21.5, "rh": 40, "ok": True}),
    (1, "sensors/kitchen/json", {"ts": 1714564800, "temp": 21.5}),
    (1, "sensors/kitchen/json", {"ts": 1714564800123, "temp": 21.5}),
    (2, "sensors/x", {"id": "probe", "time": "2024-05-01T12:00:00+02:00", "temperature": 4.5}),
    (3, "sensors/x", {"meta": {"id": 17, "ts": 1714564800.5}, "value": -0.25, "list": [1, 2]}),
    (4, "sensors/a/dev-9", {"ts": 1714564800000, "v": 3}),
    (5, "sensors/kitchen/json", {"env": {"t": 21.5, "h": 40}, "relay": [True]}),
    (6, "sensors/x", {"id": "d", "v": 1e308, "a/b": [2]}),
    (7, "a/b/c/d/e/f/g/h", {"x": 1}),
]
for i, (sel, topic, payload) in enumerate(mqtt):
    body = json.dumps(payload).encode()
    write("mqtt_json", f"config{sel}-{i}", bytes([sel | 8 | ((i % 4) << 4)]) + topic.encode() + b"\n" + body)
    write("mqtt_json", f"config{sel}-{i}-default-topic", bytes([sel]) + body)
write("mqtt_json", "bare-number", b"\x00" + b"21.5")

# --- Serial lines --------------------------------------------------------------------
def serial(sel, lines, ending=b"\n", max_len=0, cuts=(85, 170)):
    framing = (max_len // 2) << 1 | (1 if ending == b"\r" else 0)
    return bytes([sel, framing & 0xFF, cuts[0], cuts[1]]) + ending.join(lines) + ending


ROLE_NONE, ROLE_DEV, ROLE_METRIC, ROLE_TIME = 0, 1 << 3, 2 << 3, 3 << 3
TS_RFC, TS_UNIX, TS_MS, TS_PAT = 0, 1 << 5, 2 << 5, 3 << 5
seeds = {
    "json-plain": serial(0, [b'{"temp": 21.5, "rh": 40, "wind": {"speed": 3.2, "dir": 270}}', b'{"temp": "22.1"}', b"[1,2]", b"not json"]),
    "json-device-time": serial(ROLE_TIME | TS_RFC, [b'{"device": "ws-1", "time": "2024-05-01T12:00:00Z", "temp": 21.5}'], ending=b"\r\n"),
    "json-metric-unix": serial(ROLE_METRIC | TS_UNIX, [b'{"device": "ws-1", "time": 1714564800.25, "metric": "temp", "value": 21.5, "unit": "\xc2\xb0C"}']),
    "csv-header": serial(1 | ROLE_DEV, [b"device,temp,rh", b"ws-1,21.5,40", b'"ws-2","22.0",41', b"ws-3,,", b"1,2,3"]),
    "csv-header-time-pattern": serial(1 | ROLE_TIME | TS_PAT, [b"time,device,temp", b"2024-05-01 12:00:00,ws-1,21.5"]),
    "csv-columns": serial(2 | ROLE_METRIC | TS_MS, [b"ws-1;1714564800123;temp;21.5;C;0", b"ws-1;x;temp;nan;C;0"]),
    "csv-tab": serial(6, [b"temp\trh", b"21.5\t40"]),
    "key-value": serial(3 | ROLE_DEV, [b"device=ws-1 temp=21.5 rh=40", b"temp=21.5,rh=40;p=1013.2", b"garbage", b"x=1e3 y=-0.5"]),
    "regex-device": serial(4 | ROLE_DEV, [b"ws-1 21.5 3", b"ws_2 -0.5", b"bad line here x"]),
    "regex-metric": serial(5 | ROLE_METRIC | TS_PAT, [b"2024-05-01 12:00:00 ws-1 temp=21.5 C", b"2024-05-01T12:00:00Z ws-1 rh=40"]),
    "cr-endings": serial(3, [b"temp=21.5", b"rh=40\n", b"p=1"], ending=b"\r"),
    "overlong": serial(3, [b"temp=1", b"x" * 100, b"temp=2"], max_len=32, cuts=(10, 200)),
    "partial-tail": bytes([0, 0, 128, 200]) + b'{"temp": 1}\n{"temp": 2',
}
for name, data in seeds.items():
    write("serial_line", name, data)

# --- Modbus --------------------------------------------------------------------------
def regs(*words):
    return b"".join(w.to_bytes(2, "big") for w in words)


write("modbus_registers", "u16", bytes([0, 2]) + regs(215, 400))
write("modbus_registers", "i16-little-bytes", bytes([1 | 16, 1]) + regs(0xFFFE))
write("modbus_registers", "u32", bytes([2, 1]) + regs(0x0001, 0x86A0))
write("modbus_registers", "i32-little-words", bytes([3 | 8, 2]) + regs(0xFFFF, 0xFFFF, 0, 1))
write("modbus_registers", "f32", bytes([4, 1]) + regs(0x41AC, 0x0000))
write("modbus_registers", "f32-nan", bytes([4, 1]) + regs(0x7FC0, 0x0000))
write("modbus_registers", "f32-swapped", bytes([4 | 8 | 16, 1]) + regs(0x0000, 0xAC41))
write("modbus_registers", "frame-fc3", bytes([2 << 5, 2]) + bytes.fromhex("0103040001000284e0"))
write("modbus_registers", "exception", bytes([0, 1]) + bytes.fromhex("0183020c31"))
write("modbus_registers", "coils", bytes([0, 10]) + bytes([0b10110011, 0b00000010]))

# --- Configuration -------------------------------------------------------------------
with open(os.path.join(ROOT, "config", "outpost.toml")) as f:
    example = f.read()


def strip(text):
    return "".join(l for l in text.splitlines(True) if l.strip() and not l.lstrip().startswith("#"))


uncommented = re.sub(r"(?m)^#(?=\[|[a-z_]+ = )", "", example)
write("config_load", "example", strip(example))
write("config_load", "example-all-sources", strip(uncommented))
DROP = "\n#%dropin\n"
ENV = "\n#%env\n"
small = """[agent]
gateway_id = "site-01"
site = "Bistro"
[storage]
path = "/var/lib/outpost/outpost.db"
[[sources]]
type = "simulated"
name = "sim"
"""
write("config_load", "dropins-env",
      small + DROP + '[[sources]]\ntype = "mqtt"\nname = "m"\ntopics = ["s/#"]\ndevice_segment = 1\n[sources.broker]\nhost = "${HOME}"\ntls = false\n'
      + DROP + '[storage]\nmax_size = "1GiB"\n[log]\nlevel = "debug"\n'
      + ENV + "STORAGE__BATCH_MAX_ROWS=500\nLOG__LEVEL=info\nAGENT__SITE=${NO_SUCH:-x}\n")
write("config_load", "secret-file",
      small + '[sync]\nhost = "pgbouncer.example"\ndatabase = "outpost"\nuser = "site01"\npassword_file = "/etc/hostname"\n')
write("config_load", "expand-env", '[agent]\ngateway_id = "${NO_SUCH_OUTPOST_VAR:-gw}"\nsite = "$${literal}"\n[storage]\npath = "${HOME}/x.db"\n')
write("config_load", "errors", '[agent]\ngateway_id = 5\n[bogus]\n[[sources]]\ntype = "nope"\n[[alerts]]\nabove = "x"\n')
write("config_load", "syntax-error", '[agent\ngateway_id = "x"\n' + DROP + "[[sources]]\ntype = 'simulated'\nname = 'a'\nname = 'b'\n")
write("config_load", "not-utf8", b'[agent]\nsite = "\xff\xfe"\n')
print("seeds written to", OUT, file=sys.stderr)
