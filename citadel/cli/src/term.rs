//! Terminal helpers: colours, the login code display, a spinner, and SIGTERM.

use std::time::Duration;

/// Whether to colour stdout.
pub(crate) fn use_color(no_color: bool) -> bool {
    use std::io::IsTerminal;
    !no_color && std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
}

/// Shows a login code: URL, code and (on a terminal) a QR code of the complete URL.
pub(crate) fn show_login(url: &str, code: Option<&str>, qr: bool) {
    use std::io::IsTerminal;
    eprintln!("\nTo log in, open:\n\n    {url}\n");
    if let Some(c) = code {
        eprintln!("and enter the code:  {c}\n");
    }
    if qr && std::io::stderr().is_terminal() {
        if let Ok(q) = qrcode::QrCode::new(url.as_bytes()) {
            eprintln!("{}", q.render::<qrcode::render::unicode::Dense1x2>().quiet_zone(true).build());
        }
    }
}

/// A spinner on stderr while `fut` runs (only on a terminal).
pub(crate) async fn with_spinner<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    use std::io::{IsTerminal, Write};
    if !std::io::stderr().is_terminal() {
        return fut.await;
    }
    let what = what.to_string();
    let spin = tokio::spawn(async move {
        let frames = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];
        for i in 0.. {
            eprint!("\r{} {what}", frames[i % frames.len()]);
            let _ = std::io::stderr().flush();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let out = fut.await;
    spin.abort();
    eprint!("\r\x1b[2K");
    out
}

/// SIGTERM where there is one (Windows has only Ctrl-C, handled beside it).
pub(crate) struct Terminate(#[cfg(unix)] tokio::signal::unix::Signal);

impl Terminate {
    pub(crate) fn new() -> Self {
        #[cfg(unix)]
        return Terminate(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler"),
        );
        #[cfg(not(unix))]
        return Terminate();
    }

    pub(crate) async fn recv(&mut self) -> Option<()> {
        #[cfg(unix)]
        return self.0.recv().await;
        #[cfg(not(unix))]
        std::future::pending().await
    }
}
