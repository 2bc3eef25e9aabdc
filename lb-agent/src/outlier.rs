//! Passive outlier ejection, the decision half: the per-service policy
//! from its annotation and the state machine that turns the datapath's
//! per-backend attempt counters (`LB_BACKEND_STATS_V1`: answered, failed)
//! into ejections and re-admissions. Pure: no maps, no clock of its own
//! (the caller passes `now`), so every rule is unit-tested here.
//!
//! Not wired into the agent yet: programming a service without its
//! ejected backends (and keeping their established flows) is the other
//! half.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use crate::conntrack_config::parse_go_duration;

/// The Service annotation that turns outlier ejection on, with its policy:
/// `consecutive-failures=5,interval=10s,base-ejection=30s,max-ejected=50%`
/// (every key optional, these are the defaults).
pub const ANNOTATION: &str = "lb-agent.dev/outlier-detection";

/// The longest an ejection lasts, however often the backend was ejected
/// (the doubling stops here).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// A service's ejection policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Failed attempts in a row (no answered one in between) that eject.
    pub consecutive_failures: u64,
    /// How often the counters are evaluated.
    pub interval: Duration,
    /// The first ejection's length; each repeat doubles it.
    pub base_ejection: Duration,
    /// At most this share of a service's backends is ejected at once
    /// (rounded down: a service with one backend never loses it).
    pub max_ejected_percent: u8,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            consecutive_failures: 5,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejected_percent: 50,
        }
    }
}

impl Policy {
    /// Parses the annotation's value; the error names the key and what is
    /// wrong with it (the caller prefixes the service and annotation).
    pub fn parse(value: &str) -> Result<Policy, String> {
        let mut policy = Policy::default();
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, val) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not KEY=VALUE"))?;
            let (key, val) = (key.trim(), val.trim());
            let duration = |val: &str| {
                let d = parse_go_duration(val).map_err(|e| format!("{key}: {e}"))?;
                if d.is_zero() {
                    return Err(format!("{key}: must be more than 0"));
                }
                Ok(d)
            };
            match key {
                "consecutive-failures" => {
                    policy.consecutive_failures = match val.parse::<u64>() {
                        Ok(n) if n > 0 => n,
                        _ => return Err(format!("{key}: {val:?} is not a count above 0")),
                    }
                }
                "interval" => policy.interval = duration(val)?,
                "base-ejection" => policy.base_ejection = duration(val)?,
                "max-ejected" => {
                    policy.max_ejected_percent = match val
                        .strip_suffix('%')
                        .and_then(|n| n.trim().parse::<u8>().ok())
                    {
                        Some(p) if p <= 100 => p,
                        _ => return Err(format!("{key}: {val:?} is not a share like 50%")),
                    }
                }
                other => {
                    return Err(format!(
                        "unknown key {other:?} (consecutive-failures, interval, base-ejection, \
                         max-ejected)"
                    ));
                }
            }
        }
        Ok(policy)
    }

    /// How many of `backends` may be ejected at once.
    pub fn max_ejected(&self, backends: usize) -> usize {
        backends * usize::from(self.max_ejected_percent) / 100
    }

    /// The length of a backend's `nth` ejection (0-based): doubling, at
    /// most [`MAX_EJECTION`] (or the base, if that is longer).
    pub fn ejection(&self, nth: u32) -> Duration {
        let doubled = self
            .base_ejection
            .checked_mul(1u32.checked_shl(nth).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX);
        doubled.min(MAX_EJECTION.max(self.base_ejection))
    }
}

/// A backend's attempt counters as the datapath holds them (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attempts {
    pub answered: u64,
    pub failed: u64,
}

/// What happened to a backend at an evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<B> {
    /// Ejected until `now + for_`, after `failures` consecutive failures.
    Ejected {
        backend: B,
        failures: u64,
        for_: Duration,
    },
    /// Its threshold was reached but the service's cap was: kept.
    CapReached { backend: B, failures: u64 },
    /// Its ejection ended: back in new-flow selection.
    Readmitted { backend: B },
}

/// One backend's ejection state.
#[derive(Clone, Copy, Debug, Default)]
struct Health {
    seen: Attempts,
    consecutive: u64,
    /// Ejected until this time (the caller's clock), if ejected.
    until: Option<Duration>,
    /// Ejections so far (the next one lasts `base * 2^ejections`).
    ejections: u32,
}

/// The ejection state of one service's backends.
#[derive(Clone, Debug, Default)]
pub struct Ejector<B: Ord + Clone> {
    backends: BTreeMap<B, Health>,
}

impl<B: Ord + Clone> Ejector<B> {
    /// The backends ejected now.
    pub fn ejected(&self) -> BTreeSet<B> {
        self.backends
            .iter()
            .filter(|(_, h)| h.until.is_some())
            .map(|(b, _)| b.clone())
            .collect()
    }

    /// Evaluates the counters read at `now` (a monotonic time, the
    /// caller's clock) under `policy`: re-admits backends whose ejection
    /// ended, then counts each backend's failures since the last
    /// evaluation (an answered attempt in between starts the count again:
    /// the counters cannot tell the order within one interval, so a
    /// backend that answered at all is not failing in a row) and ejects
    /// those at the threshold while the cap allows, most failures first.
    /// Backends absent from `counters` left the service and are
    /// forgotten.
    pub fn evaluate(
        &mut self,
        policy: &Policy,
        counters: &BTreeMap<B, Attempts>,
        now: Duration,
    ) -> Vec<Event<B>> {
        let mut events = Vec::new();
        self.backends.retain(|b, _| counters.contains_key(b));
        for (backend, attempts) in counters {
            let health = self.backends.entry(backend.clone()).or_insert(Health {
                seen: *attempts,
                ..Health::default()
            });
            if health.until.is_some_and(|until| now >= until) {
                health.until = None;
                health.consecutive = 0;
                events.push(Event::Readmitted {
                    backend: backend.clone(),
                });
            }
            let failed = attempts.failed.saturating_sub(health.seen.failed);
            let answered = attempts.answered.saturating_sub(health.seen.answered);
            health.seen = *attempts;
            health.consecutive = if answered > 0 {
                0
            } else {
                health.consecutive + failed
            };
        }
        let mut room = policy
            .max_ejected(counters.len())
            .saturating_sub(self.ejected().len());
        let mut due: Vec<(u64, B)> = self
            .backends
            .iter()
            .filter(|(_, h)| h.until.is_none() && h.consecutive >= policy.consecutive_failures)
            .map(|(b, h)| (h.consecutive, b.clone()))
            .collect();
        due.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (failures, backend) in due {
            let Some(health) = self.backends.get_mut(&backend) else {
                continue;
            };
            if room == 0 {
                events.push(Event::CapReached { backend, failures });
                continue;
            }
            room -= 1;
            let for_ = policy.ejection(health.ejections);
            health.ejections = health.ejections.saturating_add(1);
            health.until = Some(now + for_);
            health.consecutive = 0;
            events.push(Event::Ejected {
                backend,
                failures,
                for_,
            });
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn the_annotation_parses_with_defaults_and_names_bad_keys() {
        assert_eq!(Policy::parse("").unwrap(), Policy::default());
        assert_eq!(
            Policy::parse("consecutive-failures=3, interval=2s,base-ejection=1m,max-ejected=34%")
                .unwrap(),
            Policy {
                consecutive_failures: 3,
                interval: s(2),
                base_ejection: s(60),
                max_ejected_percent: 34,
            }
        );
        for (bad, names) in [
            ("consecutive-failures=0", "consecutive-failures"),
            ("interval=0s", "interval"),
            ("base-ejection=soon", "base-ejection"),
            ("max-ejected=150%", "max-ejected"),
            ("max-ejected=50", "max-ejected"),
            ("eject=yes", "eject"),
            ("interval", "KEY=VALUE"),
        ] {
            let error = Policy::parse(bad).expect_err(bad);
            assert!(error.contains(names), "{bad}: {error}");
        }
    }

    #[test]
    fn ejections_double_up_to_the_maximum() {
        let policy = Policy::default();
        assert_eq!(policy.ejection(0), s(30));
        assert_eq!(policy.ejection(1), s(60));
        assert_eq!(policy.ejection(3), s(240));
        assert_eq!(policy.ejection(4), MAX_EJECTION);
        assert_eq!(policy.ejection(40), MAX_EJECTION);
    }

    fn counters(rows: &[(&'static str, u64, u64)]) -> BTreeMap<&'static str, Attempts> {
        rows.iter()
            .map(|(b, answered, failed)| {
                (
                    *b,
                    Attempts {
                        answered: *answered,
                        failed: *failed,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn consecutive_failures_eject_and_the_backend_returns_after_its_time() {
        let policy = Policy {
            consecutive_failures: 3,
            ..Policy::default()
        };
        let mut ejector = Ejector::default();
        // Counters as first read: history, not counted.
        ejector.evaluate(&policy, &counters(&[("a", 10, 7), ("b", 10, 0)]), s(0));
        // Two failures, then an answer: no run of three.
        let events = ejector.evaluate(&policy, &counters(&[("a", 11, 9), ("b", 20, 0)]), s(10));
        assert!(events.is_empty(), "{events:?}");
        // Three failures in a row across two intervals.
        ejector.evaluate(&policy, &counters(&[("a", 11, 11), ("b", 30, 0)]), s(20));
        let events = ejector.evaluate(&policy, &counters(&[("a", 11, 12), ("b", 40, 0)]), s(30));
        assert_eq!(
            events,
            vec![Event::Ejected {
                backend: "a",
                failures: 3,
                for_: s(30)
            }]
        );
        assert_eq!(ejector.ejected(), BTreeSet::from(["a"]));
        // Still ejected before its time is up, back at it.
        let rows = counters(&[("a", 11, 12), ("b", 50, 0)]);
        assert!(ejector.evaluate(&policy, &rows, s(59)).is_empty());
        assert_eq!(
            ejector.evaluate(&policy, &rows, s(60)),
            vec![Event::Readmitted { backend: "a" }]
        );
        assert!(ejector.ejected().is_empty());
        // Failing again: ejected for twice as long.
        let events = ejector.evaluate(&policy, &counters(&[("a", 11, 15), ("b", 60, 0)]), s(70));
        assert_eq!(
            events,
            vec![Event::Ejected {
                backend: "a",
                failures: 3,
                for_: s(60)
            }]
        );
    }

    #[test]
    fn the_cap_holds_when_most_backends_fail() {
        let policy = Policy {
            consecutive_failures: 1,
            max_ejected_percent: 50,
            ..Policy::default()
        };
        let mut ejector = Ejector::default();
        let first = counters(&[
            ("a", 0, 0),
            ("b", 0, 0),
            ("c", 0, 0),
            ("d", 0, 0),
            ("e", 0, 0),
        ]);
        ejector.evaluate(&policy, &first, s(0));
        // Four of five fail (d most): two may go (50% of 5, rounded down).
        let events = ejector.evaluate(
            &policy,
            &counters(&[
                ("a", 0, 2),
                ("b", 0, 1),
                ("c", 0, 1),
                ("d", 0, 5),
                ("e", 9, 0),
            ]),
            s(10),
        );
        assert_eq!(
            events,
            vec![
                Event::Ejected {
                    backend: "d",
                    failures: 5,
                    for_: s(30)
                },
                Event::Ejected {
                    backend: "a",
                    failures: 2,
                    for_: s(30)
                },
                Event::CapReached {
                    backend: "b",
                    failures: 1
                },
                Event::CapReached {
                    backend: "c",
                    failures: 1
                },
            ]
        );
        assert_eq!(ejector.ejected(), BTreeSet::from(["a", "d"]));
        // A service with one backend never loses it.
        let mut lonely = Ejector::default();
        lonely.evaluate(&policy, &counters(&[("a", 0, 0)]), s(0));
        let events = lonely.evaluate(&policy, &counters(&[("a", 0, 9)]), s(10));
        assert_eq!(
            events,
            vec![Event::CapReached {
                backend: "a",
                failures: 9
            }]
        );
    }

    #[test]
    fn a_backend_that_left_is_forgotten() {
        let policy = Policy {
            consecutive_failures: 1,
            max_ejected_percent: 100,
            ..Policy::default()
        };
        let mut ejector = Ejector::default();
        ejector.evaluate(&policy, &counters(&[("a", 0, 0)]), s(0));
        ejector.evaluate(&policy, &counters(&[("a", 0, 1)]), s(10));
        assert_eq!(ejector.ejected(), BTreeSet::from(["a"]));
        ejector.evaluate(&policy, &counters(&[("b", 0, 0)]), s(20));
        assert!(ejector.ejected().is_empty());
    }
}
