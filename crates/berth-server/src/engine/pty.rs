//! Terminals into boxes (`GET /v1/boxes/{id}/pty`, `berth shell`, the console).
//!
//! A terminal is an exec with a pseudo-terminal: the box's supervisor opens the terminal inside
//! the box and starts the shell on it exactly as it starts any exec (the agent uid, Landlock,
//! seccomp, the box's namespaces and cgroup), so a terminal can do nothing an exec could not.
//! The caller's tenant is checked as for exec (another tenant's box is not found), the box must
//! be running (a parked box is restored), and a box has at most [`MAX_PTYS_PER_BOX`]
//! terminals open at once: the slot is held by the returned [`Terminal`] and freed when it is
//! dropped, which also ends the shell (its process group is killed).

use super::error::EngineError;
use super::Engine;
use berth_sandbox::{ExecEvent, ExecHandle, ExecSpec, Sandbox, TtySize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Terminals one box may have open at once.
pub const MAX_PTYS_PER_BOX: usize = 4;

/// Largest terminal side, in cells, a client may ask for.
pub const MAX_PTY_SIDE: u16 = 1000;

/// How long the shell may take to start before the open fails.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The shell a terminal runs: the box's bash as a login shell where it has one, else `sh`.
const SHELL: &str = "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi";

/// An open terminal: the shell's exec stream (output as `Stdout`, then one `Exit` or
/// `Failed`; input `Stdin`, `Resize`, `Signal`) and the box's terminal slot.
pub struct Terminal {
    pub handle: ExecHandle,
    _slot: Slot,
}

impl Engine {
    /// Start a shell on a new `size` terminal in `tenant`'s running box `id`. Errors before
    /// the shell runs: not found (also another tenant's box), conflict (not running), quota
    /// (the box's terminals are all in use), invalid (a size out of range).
    pub async fn open_terminal(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        size: TtySize,
    ) -> Result<Terminal, EngineError> {
        let side = 1..=MAX_PTY_SIDE;
        if !side.contains(&size.cols) || !side.contains(&size.rows) {
            return Err(EngineError::Invalid(format!(
                "cols and rows must be between 1 and {MAX_PTY_SIDE}"
            )));
        }
        let (backend, _) = self.running_box(tenant, id).await?;
        let slot = self.terminals.take(id)?;
        let spec = ExecSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), SHELL.into()],
            env: vec![("TERM".into(), "xterm-256color".into())],
            tty: Some(size),
            ..Default::default()
        };
        let mut handle = backend.exec(id, spec).await?;
        // The first event says whether the shell runs: a failure is the caller's answer, not
        // a terminal that closes at once.
        match tokio::time::timeout(START_TIMEOUT, handle.events.recv()).await {
            Ok(Some(ExecEvent::Started { .. })) => {}
            Ok(Some(ExecEvent::Failed(m))) => {
                return Err(EngineError::Unavailable(format!(
                    "the terminal did not start: {m}"
                )))
            }
            Ok(Some(_)) | Ok(None) => {
                return Err(EngineError::Unavailable(
                    "the terminal ended before it started".into(),
                ))
            }
            Err(_) => {
                return Err(EngineError::Unavailable(
                    "the terminal did not start in time".into(),
                ))
            }
        }
        Ok(Terminal {
            handle,
            _slot: slot,
        })
    }

    /// Record activity on box `id`'s terminal: an open terminal in use keeps its box from
    /// its idle deadline, as an exec does.
    pub fn terminal_activity(&self, id: &str) {
        if let Some(h) = self.box_handle(id) {
            h.touch();
        }
    }
}

/// The terminals open on this engine, by box id (a field of the engine: each engine — each
/// server, and each test's — counts its own).
#[derive(Default)]
pub(crate) struct TerminalSlots(Arc<Mutex<HashMap<String, usize>>>);

impl TerminalSlots {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One of box `id`'s slots, or a quota error when all are held.
    fn take(&self, id: &str) -> Result<Slot, EngineError> {
        let mut counts = self.counts();
        let n = counts.entry(id.to_string()).or_insert(0);
        if *n >= MAX_PTYS_PER_BOX {
            return Err(EngineError::Quota(format!(
                "box {id} has {MAX_PTYS_PER_BOX} terminals open already"
            )));
        }
        *n += 1;
        Ok(Slot {
            id: id.to_string(),
            slots: self.0.clone(),
        })
    }

    /// Terminals open on box `id`.
    #[cfg(test)]
    fn open(&self, id: &str) -> usize {
        self.counts().get(id).copied().unwrap_or(0)
    }
}

/// One of a box's terminal slots, given back on drop.
struct Slot {
    id: String,
    slots: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_box_has_at_most_its_terminal_slots_and_gets_them_back() {
        let slots = TerminalSlots::default();
        let id = "box-slot-test";
        let held: Vec<Slot> = (0..MAX_PTYS_PER_BOX)
            .map(|_| slots.take(id).expect("free slot"))
            .collect();
        assert!(matches!(slots.take(id), Err(EngineError::Quota(_))));
        // Another box's slots are its own, and so are another engine's.
        let other = slots.take("box-slot-other").expect("another box");
        let elsewhere = TerminalSlots::default();
        assert!(elsewhere.take(id).is_ok());
        drop(held);
        assert_eq!(slots.open(id), 0);
        assert!(slots.take(id).is_ok());
        drop(other);
        assert!(!slots.counts().contains_key("box-slot-other"));
    }
}
