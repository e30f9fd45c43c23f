//! The rig's long end-to-end tests, in one test binary so that libtest
//! runs two of them at a time: each L1 is a single-vCPU TCG guest, about
//! one host core, and the CI machines have two. Every test has its own
//! scratch and work directories, disks and L1, so they share nothing but
//! the read-only images and build outputs.

mod bundle;
mod cowork;
mod egress;
mod escape;
mod run;
mod serve;
mod shares;
mod vmm_sandbox;
