//! The demo's progress on stderr, one step at a time: a spinner with the step and its elapsed
//! time on a terminal, ticked off with a line once done (`✓ services up (2.1 s)`); one plain
//! line per step otherwise; nothing at all in the tests. During the load the spinner steps aside:
//! `upstream-demo load` draws its own bars (`created`, then `settled`) on the same terminal, and
//! two processes drawing at once would garble both.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where the steps go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Hidden,
    Lines,
    Terminal,
}

/// The step under way.
struct Step {
    what: String,
    started: Instant,
    spinner: Option<ProgressBar>,
    /// Another process draws meanwhile.
    handed_over: bool,
}

pub struct Progress {
    mode: Mode,
    step: Mutex<Option<Step>>,
}

impl Progress {
    /// Silent (the `demo_flow` suite).
    pub fn hidden() -> Self {
        Self { mode: Mode::Hidden, step: Mutex::new(None) }
    }

    /// A spinner when stderr is a terminal, plain `demo: …` lines when it is not.
    pub fn stderr() -> Self {
        let mode = if std::io::stderr().is_terminal() { Mode::Terminal } else { Mode::Lines };
        Self { mode, step: Mutex::new(None) }
    }

    /// Whether a person is watching (the load's own bars show then too).
    pub fn on_terminal(&self) -> bool {
        self.mode == Mode::Terminal
    }

    /// Ends the step under way (ticked off) and starts `what`, with a spinner on a terminal.
    pub fn start(&self, what: impl Into<String>) {
        self.begin(what.into(), true);
    }

    /// Ends the step under way and starts `what`, without a spinner: another process draws on
    /// the terminal meanwhile.
    pub fn hand_over(&self, what: impl Into<String>) {
        self.begin(what.into(), false);
    }

    fn begin(&self, what: String, spin: bool) {
        self.done();
        let spinner = match self.mode {
            Mode::Hidden => None,
            Mode::Lines => {
                eprintln!("demo: {what}");
                None
            }
            Mode::Terminal if !spin => {
                eprintln!("  ▸ {what}");
                None
            }
            Mode::Terminal => {
                let style = ProgressStyle::with_template("  {spinner} {msg} {elapsed:.dim}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner())
                    .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✓");
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
                    .with_style(style)
                    .with_message(what.clone());
                bar.enable_steady_tick(Duration::from_millis(100));
                Some(bar)
            }
        };
        *self.lock() = Some(Step { what, started: Instant::now(), spinner, handed_over: !spin });
    }

    /// Ticks off the step under way, if any: `✓ what (1.2 s)` on a terminal.
    pub fn done(&self) {
        let Some(step) = self.lock().take() else { return };
        if let Some(spinner) = &step.spinner {
            spinner.finish_and_clear();
        }
        if self.mode == Mode::Terminal {
            // After another process's bars the cursor is still on their last line (or, when that
            // line filled the width, about to wrap): back to its start, then onto the next.
            let after_bars = if step.handed_over { "\r\n" } else { "" };
            eprintln!("{after_bars}  ✓ {} ({})", step.what, duration(step.started.elapsed()));
        }
    }

    /// Clears the step under way without ticking it off (it failed, or was interrupted).
    pub fn abandon(&self) {
        if let Some(step) = self.lock().take()
            && let Some(spinner) = step.spinner
        {
            spinner.finish_and_clear();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Step>> {
        self.step.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// `0.4 s`, `12.3 s`, `2 min 05 s`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        let whole = d.as_secs();
        format!("{} min {:02} s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_says_them() {
        assert_eq!(duration(Duration::from_millis(420)), "0.4 s");
        assert_eq!(duration(Duration::from_millis(12_345)), "12.3 s");
        assert_eq!(duration(Duration::from_secs(125)), "2 min 05 s");
    }
}
