#!/usr/bin/env python3
"""A Modbus RTU slave (several slave ids on one bus) for Outpost's tests.

Runs pymodbus (pinned in scripts/install-test-deps) on a serial device, usually the
peer end of a socat pty pair. Values are encoded here with Python's `struct`, an
implementation independent of the agent's decoder.

    modbus_slave.py SPEC.json

SPEC: {"port": "/path", "baud": 9600,
       "slaves": {"1": {"holding": [{"address": 0, "type": "f32", "word_order": "big",
                                     "byte_order": "big", "value": 21.5}, ...],
                        "input": [...],
                        "coils": [{"address": 0, "values": [1, 0, 1]}],
                        "discrete": [...]}}}

Slave ids not in SPEC never answer. Reading an address outside a table gives the
"Illegal data address" exception. Every request is appended to SPEC.requests as
"<monotonic seconds> <slave id> <function code>". Prints "ready" once serving and exits
when its standard input closes, so it never outlives the test.
"""

import asyncio
import json
import struct
import sys
import time

from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.server import ModbusSerialServer
from pymodbus.transaction import ModbusRtuFramer

FORMATS = {"u16": "H", "i16": "h", "u32": "I", "i32": "i", "f32": "f"}


def encode(entry):
    """Registers for one typed value, in the requested word and byte order."""
    fmt = FORMATS[entry.get("type", "u16")]
    value = entry["value"]
    if fmt != "f":
        value = int(value)
    raw = struct.pack(">" + fmt, value)  # big-endian bytes: high word, high byte first
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if entry.get("word_order", "big") == "little":
        words.reverse()
    if entry.get("byte_order", "big") == "little":
        words = [w[::-1] for w in words]
    return [struct.unpack(">H", w)[0] for w in words]


def table(entries, bits):
    cells = {}
    for entry in entries:
        values = entry["values"] if bits else encode(entry)
        for i, v in enumerate(values):
            cells[entry["address"] + i] = int(v)
    size = (max(cells) + 1) if cells else 1
    # Addresses outside [0, size) answer "Illegal data address".
    return ModbusSequentialDataBlock(0, [cells.get(a, 0) for a in range(size)])


async def main():
    spec_path = sys.argv[1]
    with open(spec_path) as f:
        spec = json.load(f)
    slaves = {}
    for sid, s in spec["slaves"].items():
        slaves[int(sid)] = ModbusSlaveContext(
            hr=table(s.get("holding", []), False),
            ir=table(s.get("input", []), False),
            co=table(s.get("coils", []), True),
            di=table(s.get("discrete", []), True),
            zero_mode=True,
        )
    context = ModbusServerContext(slaves=slaves, single=False)
    trace = open(spec_path + ".requests", "a", buffering=1)

    def tracer(request, *_addr):
        trace.write(f"{time.monotonic():.6f} {request.slave_id} {request.function_code}\n")

    server = ModbusSerialServer(
        context,
        framer=ModbusRtuFramer,
        port=spec["port"],
        baudrate=spec.get("baud", 9600),
        ignore_missing_slaves=True,
        request_tracer=tracer,
    )
    serving = asyncio.create_task(server.serve_forever())
    while server.transport is None:  # the port is open once the transport exists
        if serving.done():
            serving.result()  # raises the reason it could not open the port
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    # Exit when the test process goes away (stdin closes).
    await loop.run_in_executor(None, sys.stdin.read)
    serving.cancel()
    await server.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
