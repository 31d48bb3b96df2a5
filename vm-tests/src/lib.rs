//! Support code for tests that need a real kernel: network namespaces, probes, the daemon,
//! frames for `BPF_PROG_TEST_RUN`, and random policies for differential tests.

pub mod harness;
pub mod lab;
pub mod packet_builder;
pub mod policy_gen;
