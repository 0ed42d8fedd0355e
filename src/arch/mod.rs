//! What a guest operating system expects of the machine, per architecture:
//! the boot protocol, CPUID, boot registers and firmware tables.

pub mod x86_64;
