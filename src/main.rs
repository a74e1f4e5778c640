//! The `outpost` binary: parse the command line and hand over to the library.

fn main() -> std::process::ExitCode {
    outpost::cli::main()
}

/// The C math functions the executable calls (the simulated source's sine, number
/// formatting's `log10`, the console chart's `pow`, tokio's scheduler statistics' `pow`
/// and `exp2`), defined here from the `libm` crate (rust-lang's port of musl's libm)
/// instead of taken from the system's libm.so.6. With no reference left, the linker
/// (`--as-needed`) drops libm.so.6 from the executable, and with it about 600 KiB of
/// resident memory that its code, tables and symbol lookup cost every agent (issue 15,
/// docs/benchmarks.md "Footprint: memory", session 9). A function of libm that is not
/// defined here simply keeps libm.so.6 linked, as before.
mod math {
    #[no_mangle]
    extern "C" fn sin(x: f64) -> f64 {
        libm::sin(x)
    }

    #[no_mangle]
    extern "C" fn log10(x: f64) -> f64 {
        libm::log10(x)
    }

    #[no_mangle]
    extern "C" fn pow(x: f64, y: f64) -> f64 {
        libm::pow(x, y)
    }

    #[no_mangle]
    extern "C" fn exp2(x: f64) -> f64 {
        libm::exp2(x)
    }
}
