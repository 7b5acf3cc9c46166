//! Kernel drops with their reason (bpf `flowmap_kfree_skb`): the names of
//! the running kernel's `enum skb_drop_reason`, read from its BTF at load,
//! and the drain of the per-period drops maps.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use libbpf_rs::btf::types::Enum;
use libbpf_rs::btf::Btf;

use crate::flow::ConnKey;

/// Reasons that mean "freed, not dropped" and are not counted:
/// SKB_NOT_DROPPED_YET, SKB_CONSUMED, and SKB_DROP_REASON_NOT_SPECIFIED
/// (what plain `kfree_skb()` passes: every caller that frees an skb
/// without a reason, most of them normal consumption paths).
pub const NOT_DROPS: [&str; 3] = [
    "SKB_NOT_DROPPED_YET",
    "SKB_CONSUMED",
    "SKB_DROP_REASON_NOT_SPECIFIED",
];

/// At most this many distinct reason names are kept (the kernel's enum has
/// about 130); other values share [`OTHER`].
pub const MAX_REASONS: usize = 1024;
pub const OTHER: &str = "OTHER";

/// The names of `enum skb_drop_reason` by value, without the
/// `SKB_DROP_REASON_` prefix (`NETFILTER_DROP`), and the values of
/// [`NOT_DROPS`] for the program.
#[derive(Debug, Clone)]
pub struct DropReasons {
    names: HashMap<u32, Arc<str>>,
    pub skip: [u32; 3],
    other: Arc<str>,
}

impl DropReasons {
    /// Reads the enum from the running kernel's BTF (/sys/kernel/btf/vmlinux).
    pub fn from_kernel() -> Result<DropReasons> {
        let btf = Btf::from_vmlinux().context("reading the kernel's BTF")?;
        let e: Enum<'_> = btf.type_by_name("skb_drop_reason").ok_or_else(|| {
            anyhow!("the kernel's BTF has no enum skb_drop_reason (kernel older than 5.17)")
        })?;
        let members = e
            .iter()
            .filter_map(|m| Some((m.name?.to_str()?.to_string(), m.value)));
        Self::from_members(members)
    }

    /// From (name, value) pairs of the enum.
    pub fn from_members(members: impl IntoIterator<Item = (String, i64)>) -> Result<DropReasons> {
        let mut names = HashMap::new();
        let mut skip = [None; 3];
        for (name, value) in members {
            let Ok(v) = u32::try_from(value) else {
                continue;
            };
            if let Some(i) = NOT_DROPS.iter().position(|n| *n == name) {
                skip[i] = Some(v);
            }
            if names.len() < MAX_REASONS {
                let short = name.strip_prefix("SKB_DROP_REASON_").unwrap_or(&name);
                names.insert(v, Arc::from(short));
            }
        }
        // A kernel without SKB_CONSUMED: repeat another value that is skipped.
        let first = skip
            .iter()
            .flatten()
            .copied()
            .next()
            .ok_or_else(|| anyhow!("enum skb_drop_reason has none of {NOT_DROPS:?}"))?;
        Ok(DropReasons {
            names,
            skip: skip.map(|s| s.unwrap_or(first)),
            other: Arc::from(OTHER),
        })
    }

    /// The name of a reason value ([`OTHER`] for one the enum lacks, e.g. a
    /// subsystem's own reasons).
    pub fn name(&self, reason: u32) -> Arc<str> {
        self.names.get(&reason).unwrap_or(&self.other).clone()
    }
}

/// Packets the kernel dropped in one drain period for one reason, on one
/// connection (`None`: the packet's headers did not parse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub conn: Option<ConnKey>,
    pub reason: Arc<str>,
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_without_prefix_and_skipped_values() {
        let r = DropReasons::from_members([
            ("SKB_NOT_DROPPED_YET".to_string(), 0),
            ("SKB_CONSUMED".to_string(), 1),
            ("SKB_DROP_REASON_NOT_SPECIFIED".to_string(), 2),
            ("SKB_DROP_REASON_NETFILTER_DROP".to_string(), 9),
        ])
        .unwrap();
        assert_eq!(r.skip, [0, 1, 2]);
        assert_eq!(&*r.name(9), "NETFILTER_DROP");
        assert_eq!(&*r.name(77), "OTHER");
        let old = DropReasons::from_members([
            ("SKB_DROP_REASON_NOT_SPECIFIED".to_string(), 0),
            ("SKB_DROP_REASON_NO_SOCKET".to_string(), 1),
        ])
        .unwrap();
        assert_eq!(old.skip, [0, 0, 0]);
        assert!(DropReasons::from_members([("X".to_string(), 1)]).is_err());
    }
}
