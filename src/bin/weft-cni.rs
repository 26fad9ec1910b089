//! weft-cni: weft's chained CNI plugin. The container runtime runs it with the CNI
//! environment and the network configuration on stdin; see `weft::cni::plugin`.

use std::io::{Read, Write};

/// Network configurations are small; this bounds a runaway stdin.
const MAX_STDIN: u64 = 1 << 20;

fn main() {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin);
    let inv = weft::cni::plugin::Invocation {
        env: std::env::vars().collect(),
        stdin,
    };
    let outcome = weft::cni::plugin::run(&inv);
    for line in &outcome.log {
        eprintln!("{line}");
    }
    if let Some(out) = outcome.stdout {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{out}");
        let _ = stdout.flush();
    }
    std::process::exit(outcome.exit_code);
}
