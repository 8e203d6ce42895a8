//! secretfs: a Kubernetes CSI node driver that serves secrets as read-only files through
//! FUSE, from memory the kernel keeps out of the page cache, swap and core dumps.
//!
//! Data flows one way: CSI request ([`csi`]) → class ([`class`]) → provider ([`provider`]) →
//! secret memory ([`secret_mem`]) → FUSE view ([`fs`]), orchestrated per volume by [`volume`];
//! [`rotation`] refreshes published volumes through the same path.

pub mod admin;
pub mod class;
pub mod csi;
pub mod demo;
pub mod fs;
pub mod grpc_uds;
pub mod handoff;
pub mod hardening;
pub mod metrics;
pub mod podstatus;
pub mod proto;
pub mod provider;
pub mod rotation;
pub mod secret_mem;
pub mod volume;
