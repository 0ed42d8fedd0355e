//! CPUID as each vCPU reports it: KVM's supported set, with this vCPU's
//! APIC id and a topology in which **each guest NUMA node is its own
//! package (socket)** with one thread per core. A guest kernel then numbers
//! its CPUs as the ACPI tables (MADT, SRAT) describe them, and never sees
//! two CPUs of different nodes share a last-level cache (Linux warns and
//! ignores such a "sibling").

use kvm_bindings::CpuId;

/// Leaf 1 EDX: more than one logical processor in the package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x8000_0001 ECX: AMD's topology extensions (leaf 0x8000_001e).
/// Cleared: KVM fills that leaf with the host's view, which would contradict
/// the topology given here.
const EXT1_ECX_TOPOEXT: u32 = 1 << 22;
/// Extended topology leaf level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `count` things.
fn bits_for(count: u32) -> u32 {
    32 - count.saturating_sub(1).leading_zeros()
}

/// Fewest APIC-id bits a package's cores get: AMD family 17h kernels take
/// the last-level cache id as `apic_id >> 3`, so packages 8 ids apart never
/// share one.
const MIN_CORE_BITS: u32 = 3;

/// The vCPUs' APIC ids and the package layout they encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuTopology {
    /// APIC id of each vCPU, by vCPU index (also its KVM vCPU id).
    pub apic_ids: Vec<u32>,
    /// Low APIC-id bits that number the cores inside a package.
    pub core_bits: u32,
    /// vCPUs in each vCPU's package, by vCPU index.
    pub package_cpus: Vec<u32>,
}

/// One package per guest node: packages are numbered in the order their
/// nodes first appear among the vCPUs, so vCPU 0 (the boot CPU, which KVM
/// expects at APIC id 0) always has APIC id 0.
pub fn topology(vcpu_nodes: &[u32]) -> CpuTopology {
    let mut packages: Vec<u32> = Vec::new();
    for n in vcpu_nodes {
        if !packages.contains(n) {
            packages.push(*n);
        }
    }
    let per_package: Vec<u32> = packages
        .iter()
        .map(|p| vcpu_nodes.iter().filter(|n| *n == p).count() as u32)
        .collect();
    let core_bits = bits_for(per_package.iter().copied().max().unwrap_or(1)).max(MIN_CORE_BITS);
    let mut next = vec![0u32; packages.len()];
    let mut apic_ids = Vec::new();
    let mut package_cpus = Vec::new();
    for n in vcpu_nodes {
        let p = packages.iter().position(|q| q == n).unwrap_or(0);
        apic_ids.push(((p as u32) << core_bits) | next[p]);
        next[p] += 1;
        package_cpus.push(per_package[p]);
    }
    CpuTopology {
        apic_ids,
        core_bits,
        package_cpus,
    }
}

/// KVM's supported CPUID adjusted for vCPU `index` of `topo`.
pub fn for_vcpu(supported: &CpuId, topo: &CpuTopology, index: usize) -> CpuId {
    let mut c = supported.clone();
    let id = topo.apic_ids[index];
    let count = topo.package_cpus[index];
    let core_bits = topo.core_bits;
    // The package's APIC-id space: what leaves 1 and 4 count as "logical
    // processors per package".
    let span = 1u32 << core_bits;
    for e in c.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id & 0xff) << 24) | (span.min(255) << 16);
                e.edx |= LEAF1_EDX_HTT;
                e.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            0x4 => {
                // Cores per package - 1 in EAX[31:26]; logical processors
                // sharing the cache - 1 in EAX[25:14]: one core for L1 and
                // L2, the whole package (= guest node) for L3 (Intel).
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { span - 1 } else { 0 };
                e.eax =
                    (e.eax & 0x3fff) | ((sharing.min(0xfff)) << 14) | (((span - 1).min(63)) << 26);
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0001 => e.ecx &= !EXT1_ECX_TOPOEXT,
            0x8000_0008 => {
                // Cores - 1 and the APIC id bits that number them (AMD).
                e.ecx = (e.ecx & !0xf0ff) | ((span - 1) & 0xff) | (core_bits << 12);
            }
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_0800,
            ..Default::default()
        }
    }

    #[test]
    fn each_guest_node_is_a_package_and_vcpu_0_has_apic_id_0() {
        let t = topology(&[1, 0, 1, 0, 1]);
        assert_eq!(t.core_bits, 3);
        assert_eq!(t.apic_ids, vec![0, 8, 1, 9, 2]);
        assert_eq!(t.package_cpus, vec![3, 2, 3, 2, 3]);
        let big = topology(&[0; 12]);
        assert_eq!(big.core_bits, 4);
        assert_eq!(big.apic_ids[11], 11);
    }

    #[test]
    fn each_vcpu_reports_its_own_apic_id_and_its_package() {
        let mut l3 = entry(4, 3);
        l3.eax = 3 << 5;
        let mut l1 = entry(4, 0);
        l1.eax = 1 << 5;
        let base = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            l1,
            l3,
        ])
        .unwrap();
        let t = topology(&[0, 0, 1, 1]);
        let c = for_vcpu(&base, &t, 3);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 9);
        assert_eq!((s[0].ebx >> 16) & 0xff, 8);
        assert_eq!(s[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert!(s[1..4].iter().all(|e| e.edx == 9));
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx >> 8), (3, 2, LEVEL_CORE));
        assert_eq!(s[3].ecx >> 8, 0, "the last level is invalid");
        assert_eq!((s[4].eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!((s[5].eax >> 14) & 0xfff, 7, "L3 is per package");
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(5), 3);
    }
}
