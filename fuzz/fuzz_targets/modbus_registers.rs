//! See `outpost::fuzzing::modbus_registers` for the input layout and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::fuzzing::modbus_registers(data));
