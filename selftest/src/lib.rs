//! `lnet-selftest`: LNet's throughput and latency benchmark (the
//! lst-equivalent), not written yet.
//!
//! It will hold the selftest service (brw read/write and ping RPCs on
//! LNet's selftest portals, wire-compatible with the kernel's
//! `lnet_selftest`), the `lnet-selftest run|sweep|serve|compare` commands
//! and an `lst` binary that runs Lustre's lst scripts. Until then the
//! project's main job is the `lo_events` example.
