//! Reconnect delays.

use std::time::Duration;

/// Exponential backoff with jitter: the n-th delay is drawn uniformly from
/// `[d/2, d]` where `d = min(initial × 2ⁿ, max)`; `reset` after a success.
///
/// Half-jitter keeps a floor (no hammering a broker that just refused us) while spreading
/// reconnects of many bridges after a broker restart.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = ceiling / 2;
        let jitter_nanos = (ceiling - half).as_nanos() as u64;
        let random = uuid::Uuid::new_v4().as_u64_pair().0;
        half + Duration::from_nanos(if jitter_nanos == 0 {
            0
        } else {
            random % jitter_nanos
        })
    }

    /// Back to `initial`, after a successful connection.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_within_jitter_and_caps() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(1000));
        for ceiling in [100, 200, 400, 800, 1000, 1000] {
            let delay = backoff.next_delay();
            assert!(
                delay >= ms(ceiling / 2) && delay <= ms(ceiling),
                "{delay:?} for ceiling {ceiling}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= ms(100));
    }
}
