#![no_main]
//! Drives the vsock device's muxer with an arbitrary program of guest and
//! host actions: TX packets (stream packets with fuzzed ops, ports, flow
//! control and payloads; any 44 header bytes; raw descriptor chains of any
//! shape, indirect and out-of-memory ones included), RX buffers, host
//! programs dialing guest ports and a host service writing to and closing
//! its streams. Every packet goes through the packet parser and validator.
//! Nothing may panic, the device must keep serving its well-formed queues,
//! and the control queue and connection count must stay within their
//! bounds (`coworkvm_vmm::vsock_testing::fuzz_one`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coworkvm_vmm::vsock_testing::fuzz_one(data).expect("the harness sets up");
});
