//! Data streams between agents: TCP connections on the migration network ([`tcp`]) driven by
//! io_uring ([`uring`]): `SENDMSG_ZC` (zero-copy, with usage reports) or `SENDMSG` from guest
//! memory and registered pool buffers on the source, `RECV` on the destination.

pub mod seal;
pub mod tcp;
pub mod uring;
