//! Call detail records (issue 20): one record per call, not per fork branch, built from what
//! the proxy sees of the call (its INVITE, its branches' answers, the caller's CANCEL, the
//! BYE) and finished when the call ends, or when it never connected. Times are Unix
//! milliseconds given by the caller: nothing here reads a clock.

use foldhash::{HashMap, HashMapExt};

/// How a call ended, as a telephony operator reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// Someone answered (the call may have been short).
    Answered,
    /// It rang, or tried to, and nobody answered in time (408, 480, Timer C's 487).
    NoAnswer,
    /// The callee was busy (486, 600).
    Busy,
    /// The caller hung up before it was answered.
    Cancelled,
    /// The callee declined it (603, 403 from the callee).
    Rejected,
    /// It could not be placed (404, 5xx, a refusal of ours).
    Failed,
}

impl Disposition {
    /// The stored and exported name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::NoAnswer => "no_answer",
            Self::Busy => "busy",
            Self::Cancelled => "cancelled",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
        }
    }

    /// The disposition named `s` (as [`Disposition::as_str`] writes it).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "answered" => Self::Answered,
            "no_answer" => Self::NoAnswer,
            "busy" => Self::Busy,
            "cancelled" => Self::Cancelled,
            "rejected" => Self::Rejected,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    /// How an unanswered call's final status reads (`cancelled`: the caller CANCELled).
    pub fn of_failure(code: u16, cancelled: bool) -> Self {
        match code {
            _ if cancelled => Self::Cancelled,
            486 | 600 => Self::Busy,
            603 | 607 => Self::Rejected,
            408 | 480 | 487 => Self::NoAnswer,
            _ => Self::Failed,
        }
    }
}

/// Who ended an answered call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndedBy {
    /// The caller's device sent the BYE.
    Caller,
    /// The callee's device sent the BYE.
    Callee,
    /// Nobody: the call reached the longest a call may last (`CDR_MAX_CALL`) without a BYE.
    Timeout,
    /// Unanswered calls: the proxy or the callee's side ended it (a final status).
    Network,
}

impl EndedBy {
    /// The stored and exported name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Callee => "callee",
            Self::Timeout => "timeout",
            Self::Network => "network",
        }
    }
}

/// A device as the record names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    /// `+sip.instance` of its Contact, when it sent one.
    pub instance: Option<String>,
    /// Its `User-Agent` (or `Server`, for the answering device).
    pub user_agent: Option<String>,
    /// Its address as we saw it (`IP:port`).
    pub source: Option<String>,
    /// udp, tcp, tls, ws or wss.
    pub transport: Option<String>,
    /// Its Contact URI.
    pub contact: Option<String>,
}

/// What the proxy knows of a call when its INVITE is taken.
#[derive(Debug, Clone, Default)]
pub struct CallStart {
    /// The INVITE's Call-ID.
    pub call_id: String,
    /// The caller's From tag (to tell who sends the BYE).
    pub from_tag: String,
    /// The caller's address of record (`user@domain`).
    pub caller: String,
    /// The calling device.
    pub caller_device: Device,
    /// The Request-URI dialled.
    pub dialled: String,
    /// The callee's address of record, when it is one of our users.
    pub callee: Option<String>,
}

/// A finished call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    /// The INVITE's Call-ID.
    pub call_id: String,
    /// The caller's address of record.
    pub caller: String,
    /// The calling device.
    pub caller_device: Device,
    /// The Request-URI dialled.
    pub dialled: String,
    /// The callee's address of record, when ours.
    pub callee: Option<String>,
    /// The device that answered.
    pub answered_by: Option<Device>,
    /// When the INVITE came (Unix ms).
    pub invite_at: u64,
    /// The first 18x (Unix ms).
    pub ringing_at: Option<u64>,
    /// The 2xx (Unix ms).
    pub answered_at: Option<u64>,
    /// The BYE or final status (Unix ms).
    pub ended_at: u64,
    /// How it ended.
    pub disposition: Disposition,
    /// The final status of the INVITE (200 when answered).
    pub final_code: u16,
    /// The `Reason` given with the end (a CANCEL's, a BYE's, a final's), as sent.
    pub reason: Option<String>,
    /// Who ended it.
    pub ended_by: EndedBy,
    /// Whether its media went through rtpengine.
    pub media_anchored: bool,
}

impl CallRecord {
    /// From INVITE to the first 18x or, when it never rang, to the final answer (ms).
    pub fn setup_ms(&self) -> u64 {
        self.ringing_at
            .or(self.answered_at)
            .unwrap_or(self.ended_at)
            .saturating_sub(self.invite_at)
    }

    /// Seconds of conversation: from the answer to the end (0 when never answered), rounded
    /// up as billing systems do (a 1.2 s call bills 2 s).
    pub fn talk_seconds(&self) -> u64 {
        self.answered_at
            .map_or(0, |a| self.ended_at.saturating_sub(a).div_ceil(1000))
    }
}

#[derive(Debug)]
struct Open {
    start: CallStart,
    invite_at: u64,
    ringing_at: Option<u64>,
    answered_at: Option<u64>,
    answered_by: Option<Device>,
    cancelled: Option<Option<String>>,
    media_anchored: bool,
}

impl Open {
    fn finish(
        self,
        ended_at: u64,
        disposition: Disposition,
        final_code: u16,
        reason: Option<String>,
        ended_by: EndedBy,
    ) -> CallRecord {
        CallRecord {
            call_id: self.start.call_id,
            caller: self.start.caller,
            caller_device: self.start.caller_device,
            dialled: self.start.dialled,
            callee: self.start.callee,
            answered_by: self.answered_by,
            invite_at: self.invite_at,
            ringing_at: self.ringing_at,
            answered_at: self.answered_at,
            ended_at,
            disposition,
            final_code,
            reason,
            ended_by,
            media_anchored: self.media_anchored,
        }
    }
}

/// The calls in progress, each becoming one [`CallRecord`] when it ends.
#[derive(Debug)]
pub struct CallRecords {
    open: HashMap<String, Open>,
    /// The longest a call may last without a BYE (ms).
    max_call_ms: u64,
    /// Bound on calls followed at once; beyond it new calls get no record (and are counted by
    /// the driver) rather than memory growing without end.
    capacity: usize,
}

impl CallRecords {
    /// Records for calls that last at most `max_call_ms`, `capacity` at once.
    pub fn new(max_call_ms: u64, capacity: usize) -> Self {
        Self {
            open: HashMap::new(),
            max_call_ms,
            capacity,
        }
    }

    /// Calls followed now.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// No call is followed.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// A call's INVITE was taken (authenticated, about to be routed). A retransmitted or
    /// re-authenticated INVITE of a call already followed changes nothing; false when the
    /// table is full.
    pub fn invite(&mut self, start: CallStart, now: u64) -> bool {
        if self.open.contains_key(&start.call_id) {
            return true;
        }
        if self.open.len() >= self.capacity {
            return false;
        }
        self.open.insert(
            start.call_id.clone(),
            Open {
                start,
                invite_at: now,
                ringing_at: None,
                answered_at: None,
                answered_by: None,
                cancelled: None,
                media_anchored: false,
            },
        );
        true
    }

    /// The call's media is anchored at rtpengine.
    pub fn anchored(&mut self, call_id: &str) {
        if let Some(o) = self.open.get_mut(call_id) {
            o.media_anchored = true;
        }
    }

    /// A provisional answer of one of its branches (only the first 18x counts).
    pub fn provisional(&mut self, call_id: &str, code: u16, now: u64) {
        if let Some(o) = self.open.get_mut(call_id)
            && (180..200).contains(&code)
            && o.ringing_at.is_none()
            && o.answered_at.is_none()
        {
            o.ringing_at = Some(now);
        }
    }

    /// A branch answered 2xx: the first one is the answer (later forked 2xx are the proxy's
    /// to end, not a second answer). The caller and callee of a call this answered.
    pub fn answered(
        &mut self,
        call_id: &str,
        by: Device,
        now: u64,
    ) -> Option<(String, Option<String>)> {
        let o = self.open.get_mut(call_id)?;
        if o.answered_at.is_some() {
            return None;
        }
        o.answered_at = Some(now);
        o.answered_by = Some(by);
        Some((o.start.caller.clone(), o.start.callee.clone()))
    }

    /// The caller CANCELled the call (with the CANCEL's `Reason`).
    pub fn cancelled(&mut self, call_id: &str, reason: Option<String>) {
        if let Some(o) = self.open.get_mut(call_id)
            && o.answered_at.is_none()
        {
            o.cancelled = Some(reason);
        }
    }

    /// The call's final answer was a failure `code` (from a branch or from us): the record of
    /// a call that never connected. None for a call not followed or already answered.
    pub fn failed(
        &mut self,
        call_id: &str,
        code: u16,
        reason: Option<String>,
        now: u64,
    ) -> Option<CallRecord> {
        if self.open.get(call_id)?.answered_at.is_some() {
            return None;
        }
        let o = self.open.remove(call_id)?;
        let cancelled = o.cancelled.clone();
        let (disposition, ended_by, reason) = match cancelled {
            Some(r) => (Disposition::Cancelled, EndedBy::Caller, r.or(reason)),
            None => (
                Disposition::of_failure(code, false),
                EndedBy::Network,
                reason,
            ),
        };
        Some(o.finish(now, disposition, code, reason, ended_by))
    }

    /// A BYE of the dialog `call_id` whose From tag is `from_tag`: the end of an answered
    /// call. A BYE before any answer (a branch's early dialog) ends nothing.
    pub fn bye(
        &mut self,
        call_id: &str,
        from_tag: &str,
        reason: Option<String>,
        now: u64,
    ) -> Option<CallRecord> {
        self.open.get(call_id)?.answered_at?;
        let o = self.open.remove(call_id)?;
        let ended_by = if o.start.from_tag == from_tag {
            EndedBy::Caller
        } else {
            EndedBy::Callee
        };
        Some(o.finish(now, Disposition::Answered, 200, reason, ended_by))
    }

    /// Answered calls older than the longest a call may last (their BYE never came, or went
    /// around us) end now, marked [`EndedBy::Timeout`]; unanswered calls older than that too
    /// (a final answer lost on the way), as no answer.
    pub fn sweep(&mut self, now: u64) -> Vec<CallRecord> {
        let limit = self.max_call_ms;
        let stale: Vec<String> = self
            .open
            .iter()
            .filter(|(_, o)| now.saturating_sub(o.invite_at) >= limit)
            .map(|(k, _)| k.clone())
            .collect();
        stale
            .into_iter()
            .filter_map(|k| self.open.remove(&k))
            .map(|o| {
                if o.answered_at.is_some() {
                    o.finish(now, Disposition::Answered, 200, None, EndedBy::Timeout)
                } else {
                    o.finish(now, Disposition::NoAnswer, 408, None, EndedBy::Timeout)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(call_id: &str) -> CallStart {
        CallStart {
            call_id: call_id.into(),
            from_tag: "caller-tag".into(),
            caller: "2002@ward.test".into(),
            caller_device: Device {
                user_agent: Some("Yealink SIP-T46S".into()),
                source: Some("192.0.2.10:5060".into()),
                transport: Some("udp".into()),
                ..Device::default()
            },
            dialled: "sip:2001@ward.test".into(),
            callee: Some("2001@ward.test".into()),
        }
    }

    fn desk(port: u16) -> Device {
        Device {
            source: Some(format!("192.0.2.20:{port}")),
            ..Device::default()
        }
    }

    #[test]
    fn an_answered_call_hung_up_by_the_callee_is_one_record_with_its_times() {
        let mut r = CallRecords::new(3_600_000, 10);
        assert!(r.invite(start("c1"), 1_000));
        assert!(
            r.invite(start("c1"), 1_100),
            "a retransmission is the same call"
        );
        r.provisional("c1", 100, 1_050);
        r.provisional("c1", 180, 1_200);
        r.provisional("c1", 183, 1_300);
        assert_eq!(
            r.answered("c1", desk(1), 5_000),
            Some(("2002@ward.test".into(), Some("2001@ward.test".into())))
        );
        assert_eq!(r.answered("c1", desk(2), 5_010), None, "answered once");
        assert_eq!(
            r.failed("c1", 487, None, 5_020),
            None,
            "a cancelled fork branch"
        );
        let c = r.bye("c1", "callee-tag", None, 65_000).unwrap();
        assert_eq!(
            (
                c.disposition,
                c.ended_by,
                c.invite_at,
                c.ringing_at,
                c.answered_at
            ),
            (
                Disposition::Answered,
                EndedBy::Callee,
                1_000,
                Some(1_200),
                Some(5_000)
            )
        );
        assert_eq!(c.answered_by, Some(desk(1)), "the first 2xx answered");
        assert_eq!(c.talk_seconds(), 60);
        assert!(r.is_empty());
        assert_eq!(
            r.bye("c1", "callee-tag", None, 65_100),
            None,
            "one record per call"
        );
    }

    #[test]
    fn talk_time_rounds_up_and_setup_is_to_the_first_ring() {
        let mut r = CallRecords::new(3_600_000, 10);
        r.invite(start("c1"), 1_000);
        r.provisional("c1", 180, 1_250);
        r.answered("c1", desk(1), 3_000);
        let c = r
            .bye("c1", "caller-tag", Some("Q.850;cause=16".into()), 4_200)
            .unwrap();
        assert_eq!(
            (
                c.disposition,
                c.ended_by,
                c.final_code,
                c.setup_ms(),
                c.talk_seconds()
            ),
            (Disposition::Answered, EndedBy::Caller, 200, 250, 2)
        );
        assert_eq!(c.answered_by, Some(desk(1)));
        assert_eq!(c.reason.as_deref(), Some("Q.850;cause=16"));
    }

    #[test]
    fn unanswered_calls_read_as_busy_no_answer_rejected_cancelled_or_failed() {
        let cases = [
            (486, false, Disposition::Busy),
            (600, false, Disposition::Busy),
            (480, false, Disposition::NoAnswer),
            (408, false, Disposition::NoAnswer),
            (487, false, Disposition::NoAnswer),
            (603, false, Disposition::Rejected),
            (404, false, Disposition::Failed),
            (503, false, Disposition::Failed),
            (487, true, Disposition::Cancelled),
        ];
        for (code, cancel, want) in cases {
            let mut r = CallRecords::new(3_600_000, 10);
            r.invite(start("c"), 0);
            if cancel {
                r.cancelled("c", Some("SIP;cause=200".into()));
            }
            let c = r.failed("c", code, None, 10).unwrap();
            assert_eq!((code, c.disposition), (code, want));
            assert_eq!(c.talk_seconds(), 0);
            assert_eq!(
                c.ended_by,
                if cancel {
                    EndedBy::Caller
                } else {
                    EndedBy::Network
                }
            );
        }
    }

    #[test]
    fn a_bye_before_the_answer_or_for_an_unknown_call_ends_nothing() {
        let mut r = CallRecords::new(3_600_000, 10);
        r.invite(start("c"), 0);
        assert_eq!(r.bye("c", "caller-tag", None, 5), None);
        assert_eq!(r.bye("unknown", "caller-tag", None, 5), None);
        assert_eq!(r.failed("unknown", 404, None, 5), None);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_call_whose_bye_never_comes_ends_at_the_maximum_and_says_so() {
        let mut r = CallRecords::new(60_000, 10);
        r.invite(start("up"), 0);
        r.answered("up", desk(1), 1_000);
        r.invite(start("young"), 30_000);
        assert!(r.sweep(59_999).is_empty());
        let ended = r.sweep(60_000);
        assert_eq!(ended.len(), 1);
        assert_eq!(
            (
                ended[0].call_id.as_str(),
                ended[0].ended_by,
                ended[0].talk_seconds()
            ),
            ("up", EndedBy::Timeout, 59)
        );
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut r = CallRecords::new(60_000, 2);
        assert!(r.invite(start("a"), 0));
        assert!(r.invite(start("b"), 0));
        assert!(!r.invite(start("c"), 0));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn dispositions_read_back() {
        for d in [
            Disposition::Answered,
            Disposition::NoAnswer,
            Disposition::Busy,
            Disposition::Cancelled,
            Disposition::Rejected,
            Disposition::Failed,
        ] {
            assert_eq!(Disposition::parse(d.as_str()), Some(d));
        }
        assert_eq!(Disposition::parse("other"), None);
    }
}
