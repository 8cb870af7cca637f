//! The `qcc` binary; the command line lives in `qcc::cli`.

/// Calibration allocates and frees activation-sized buffers (tens of MB) thousands of times. glibc
/// returns each one to the kernel, so the next costs freshly zeroed pages (a third of the compile's CPU
/// time went to page clearing); mimalloc keeps them for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_t` (libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Never purge freed memory back to the OS (unless the user asks through mimalloc's own variable):
    // a purged range is zeroed again by the kernel on its next use, and a compile is one short process.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is a plain store into mimalloc's option table.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    qcc::cli::main()
}
