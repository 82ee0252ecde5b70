//! The vocabulary every other part speaks: VIPs and their flags, weights, health checks, addresses as the maps
//! hold them, MAC addresses. Pure types, parsing and checks, one copy of each; nothing here
//! does I/O or knows about the balancer's state.

mod addr;
mod check;
mod duration;
mod mac;
mod mode;
mod real;
mod vip;

pub use addr::{addr_problem, check_real, family, map_addr, unmap_addr};
pub use check::{
    CheckFieldError, CheckFields, CheckSpec, CheckType, DownFlows, HttpCheck, Initial,
    OnQuorumLost, Payload, Probe, Qtype, StatusSet, Target, VipOptions, CHECK_KEYS, DEFAULT_QUORUM,
};
pub use duration::{format_duration, parse_duration};
pub use mac::{format_mac, is_host_mac, mac_problem, mac_serde, parse_mac, Mac};
pub use mode::{mix_problem, Egress, Encap, Mode, DEFAULT_GUE_PORT};
pub use real::{parse_real_addr, parse_sorry_server, RealAddr};
pub use vip::{FlagsError, ParseVipError, Proto, VipFlags, VipParseReason, VipSpec, MAX_WEIGHT};
