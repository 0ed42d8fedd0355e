//! CPUID as each vCPU reports it: KVM's supported set, with this vCPU's
//! APIC id and a topology of one socket with one thread per core, so that
//! a guest kernel numbers its CPUs the way the ACPI tables (MADT, SRAT)
//! describe them.

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

/// KVM's supported CPUID adjusted for vCPU `id` of `count` (APIC id = id).
pub fn for_vcpu(supported: &CpuId, id: u32, count: u32) -> CpuId {
    let mut c = supported.clone();
    let core_bits = bits_for(count);
    for e in c.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count.min(255)) << 16);
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                e.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            0x4 => {
                // Cores per package - 1, in EAX[31:26] (Intel).
                e.eax = (e.eax & 0x03ff_ffff) | ((count.saturating_sub(1).min(63)) << 26);
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
                e.ecx = (e.ecx & !0xf0ff) | (count.saturating_sub(1) & 0xff) | (core_bits << 12);
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
    fn each_vcpu_reports_its_own_apic_id_and_the_vcpu_count() {
        let base = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)])
            .unwrap();
        let c = for_vcpu(&base, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(s[0].edx & LEAF1_EDX_HTT, 0);
        assert!(s[1..].iter().all(|e| e.edx == 3));
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx >> 8), (2, 4, LEVEL_CORE));
        assert_eq!(s[3].ecx >> 8, 0, "the last level is invalid");
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(5), 3);
    }
}
