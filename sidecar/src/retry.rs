//! Bounded retries with exponential backoff and jitter.

use std::future::Future;
use std::time::Duration;

/// How often and how patiently an operation is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts after the first one.
    pub retries: u32,
    /// Delay before the first retry; doubles each time.
    pub base_delay: Duration,
    /// Upper bound of any single delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retries: 4,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (0-based): exponential, capped,
    /// with up to 25% random jitter so that many clients do not retry in step.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << attempt.min(20));
        let capped = exp.min(self.max_delay);
        let jitter = capped.mul_f64(fastrand::f64() * 0.25);
        capped.saturating_sub(jitter)
    }

    /// Runs `op` until it succeeds, fails with an error `transient` rejects,
    /// or the retry budget is spent; returns the last result.
    pub async fn run<T, E, F, Fut>(
        &self,
        what: &str,
        transient: impl Fn(&E) -> bool,
        mut op: F,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < self.retries && transient(&e) => {
                    let delay = self.delay(attempt);
                    tracing::warn!(
                        error = %e,
                        attempt = attempt + 1,
                        of = self.retries + 1,
                        retry_in_ms = delay.as_millis() as u64,
                        "{what} failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast(retries: u32) -> RetryPolicy {
        RetryPolicy {
            retries,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn retries_transient_errors_up_to_the_budget() {
        let calls = AtomicU32::new(0);
        let res: Result<(), String> = fast(3)
            .run(
                "op",
                |_| true,
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("boom".to_string())
                },
            )
            .await;
        assert_eq!(res.unwrap_err(), "boom");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried_and_success_stops() {
        let calls = AtomicU32::new(0);
        let res: Result<(), String> = fast(5)
            .run(
                "op",
                |e: &String| e != "fatal",
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("fatal".to_string())
                },
            )
            .await;
        assert!(res.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let calls = AtomicU32::new(0);
        let res: Result<u32, String> = fast(5)
            .run(
                "op",
                |_| true,
                || async {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    if n < 2 {
                        Err("again".into())
                    } else {
                        Ok(n)
                    }
                },
            )
            .await;
        assert_eq!(res.unwrap(), 2);
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let p = RetryPolicy {
            retries: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        for attempt in 0..30 {
            let d = p.delay(attempt);
            let nominal = Duration::from_millis(100)
                .saturating_mul(1 << attempt.min(20))
                .min(Duration::from_secs(1));
            assert!(
                d <= nominal && d >= nominal.mul_f64(0.75),
                "attempt {attempt}: {d:?}"
            );
        }
    }
}
