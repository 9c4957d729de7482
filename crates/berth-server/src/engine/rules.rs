//! The decisions of the box and session actors, as pure functions: what a box does when its
//! idle deadline passes, whether it takes a park request, how its death reads, whether a
//! session ends at its agent's first result, and what its box is told when a session ends.
//! The actors carry them out (with messages to each other: a park stops the box's sessions,
//! a restore answers with the ones to resume, an ephemeral session's end destroys its box);
//! the decisions themselves are here, and tested here.

use super::error::EngineError;
use berth_api::{BoxState, Lifecycle};
use berth_sandbox::BoxExit;

/// What a running box does when its idle deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtIdle {
    /// Snapshot it, stop its sessions, release it (hybrid boxes).
    Park,
    /// Wait another idle period: an agent in it is mid-turn (a slow model is not idleness), or
    /// an exec, file transfer or port connection is in flight (a long build is not idleness).
    Postpone,
    /// Destroy it and record it stopped (`idle_timeout`).
    Stop,
}

pub fn at_idle(lifecycle: Lifecycle, agent_mid_turn: bool, uses_in_flight: bool) -> AtIdle {
    if uses_in_flight {
        return AtIdle::Postpone;
    }
    match lifecycle {
        Lifecycle::Hybrid if agent_mid_turn => AtIdle::Postpone,
        Lifecycle::Hybrid => AtIdle::Park,
        _ => AtIdle::Stop,
    }
}

/// How a box answers a client's park request.
#[derive(Debug, PartialEq, Eq)]
pub enum ParkRequest {
    /// Park it now.
    Park,
    /// It already is: answer with the box as it is.
    AlreadyParked,
    Refuse(EngineError),
}

pub fn park_request(
    lifecycle: Lifecycle,
    state: BoxState,
    serving: bool,
    agent_mid_turn: bool,
) -> ParkRequest {
    if lifecycle != Lifecycle::Hybrid {
        ParkRequest::Refuse(EngineError::Conflict("only hybrid boxes park".into()))
    } else if state == BoxState::Parked {
        ParkRequest::AlreadyParked
    } else if !serving {
        ParkRequest::Refuse(EngineError::Conflict(format!("box is {}", state.as_str())))
    } else if agent_mid_turn {
        ParkRequest::Refuse(EngineError::Conflict(
            "an agent in the box is mid-turn".into(),
        ))
    } else {
        ParkRequest::Park
    }
}

/// Why a box's init ended, as its `failed` reason; None when it was not a death (the box was
/// destroyed on purpose, or nothing is known yet).
pub fn death_reason(exit: Option<&BoxExit>) -> Option<String> {
    match exit? {
        BoxExit::OomKilled => Some("box init was OOM-killed".to_string()),
        BoxExit::Exited { code } => Some(format!("box init exited with code {code}")),
        BoxExit::Destroyed => None,
    }
}

/// Whether a use of the box (exec, files, ports, a message, a new session) must first bring
/// it back: parked, or on its way to or from it (the owner task finishes that first).
pub fn needs_restore(state: BoxState) -> bool {
    matches!(
        state,
        BoxState::Parked | BoxState::Parking | BoxState::Restoring
    )
}

/// Whether a session ends at its agent's first `result`: a task given with its prompt in a box
/// of its own (ephemeral) is done then, unless the client asked to keep it open.
pub fn ends_at_result(lifecycle: Lifecycle, has_prompt: bool, keep_open: bool) -> bool {
    lifecycle == Lifecycle::Ephemeral && has_prompt && !keep_open
}

/// What a box's owner task is told when a session in it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSession {
    /// The box was the session's own (ephemeral): it goes with it.
    DestroyBox,
    /// The box lives on (persistent, hybrid): nothing.
    Nothing,
}

pub fn after_session(lifecycle: Lifecycle) -> AfterSession {
    if lifecycle == Lifecycle::Ephemeral {
        AfterSession::DestroyBox
    } else {
        AfterSession::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_idle_hybrid_box_parks_and_never_mid_turn() {
        assert_eq!(at_idle(Lifecycle::Hybrid, false, false), AtIdle::Park);
        assert_eq!(at_idle(Lifecycle::Hybrid, true, false), AtIdle::Postpone);
        // Other boxes stop at their idle deadline whatever their agents do.
        assert_eq!(at_idle(Lifecycle::Persistent, true, false), AtIdle::Stop);
        for l in [
            Lifecycle::Hybrid,
            Lifecycle::Persistent,
            Lifecycle::Ephemeral,
        ] {
            assert_eq!(at_idle(l, false, true), AtIdle::Postpone, "{l:?}");
        }
        assert_eq!(at_idle(Lifecycle::Ephemeral, false, false), AtIdle::Stop);
    }

    #[test]
    fn a_park_request_is_refused_unless_the_box_can_park_now() {
        use BoxState::*;
        let refused = |r: ParkRequest, what: &str| match r {
            ParkRequest::Refuse(EngineError::Conflict(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a refusal naming {what:?}, got {other:?}"),
        };
        refused(
            park_request(Lifecycle::Persistent, Running, true, false),
            "only hybrid",
        );
        refused(
            park_request(Lifecycle::Hybrid, Running, true, true),
            "mid-turn",
        );
        refused(
            park_request(Lifecycle::Hybrid, Stopped, false, false),
            "stopped",
        );
        assert_eq!(
            park_request(Lifecycle::Hybrid, Parked, false, false),
            ParkRequest::AlreadyParked
        );
        assert_eq!(
            park_request(Lifecycle::Hybrid, Running, true, false),
            ParkRequest::Park
        );
    }

    #[test]
    fn a_destroyed_box_did_not_die() {
        assert_eq!(death_reason(None), None);
        assert_eq!(death_reason(Some(&BoxExit::Destroyed)), None);
        assert_eq!(
            death_reason(Some(&BoxExit::Exited { code: 3 })).as_deref(),
            Some("box init exited with code 3")
        );
        assert_eq!(
            death_reason(Some(&BoxExit::OomKilled)).as_deref(),
            Some("box init was OOM-killed")
        );
    }

    #[test]
    fn boxes_on_the_way_to_or_from_a_park_are_restored_before_use() {
        use BoxState::*;
        for s in [Parked, Parking, Restoring] {
            assert!(needs_restore(s), "{s:?}");
        }
        for s in [Creating, Running, Stopped, Failed, Destroyed] {
            assert!(!needs_restore(s), "{s:?}");
        }
    }

    #[test]
    fn a_prompted_task_in_its_own_box_ends_at_its_result_unless_kept_open() {
        assert!(ends_at_result(Lifecycle::Ephemeral, true, false));
        assert!(!ends_at_result(Lifecycle::Ephemeral, true, true));
        assert!(!ends_at_result(Lifecycle::Ephemeral, false, false));
        assert!(!ends_at_result(Lifecycle::Persistent, true, false));
        assert!(!ends_at_result(Lifecycle::Hybrid, true, false));
    }

    #[test]
    fn an_ephemeral_box_goes_with_its_session() {
        assert_eq!(
            after_session(Lifecycle::Ephemeral),
            AfterSession::DestroyBox
        );
        assert_eq!(after_session(Lifecycle::Persistent), AfterSession::Nothing);
        assert_eq!(after_session(Lifecycle::Hybrid), AfterSession::Nothing);
    }
}
