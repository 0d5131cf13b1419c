use super::*;

const RATE: Rate = Rate {
    per_sec: 2.0,
    burst: 3.0,
};

#[test]
fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
    let t0 = Instant::now();
    let mut b = None;
    for _ in 0..3 {
        let (next, r) = take(b, RATE, t0);
        assert_eq!(r, Ok(()));
        b = Some(next);
    }
    let (next, r) = take(b, RATE, t0);
    assert_eq!(r, Err(Duration::from_millis(500)), "one token every 500 ms");
    b = Some(next);
    // Half a second later one token is back, and only one.
    let t1 = t0 + Duration::from_millis(500);
    let (next, r) = take(b, RATE, t1);
    assert_eq!(r, Ok(()));
    assert!(take(Some(next), RATE, t1).1.is_err());
    // A long quiet period refills to the burst, not beyond.
    assert_eq!(level(Some(next), RATE, t1 + Duration::from_secs(3600)), 3.0);
}

#[test]
fn rate_limiter_keeps_one_bucket_per_key_and_a_zero_rate_is_off() {
    let limiter = RateLimiter::new(
        Rate {
            per_sec: 1.0,
            burst: 1.0,
        },
        100,
    );
    let t0 = Instant::now();
    assert!(limiter.check("a", t0).is_ok());
    assert!(limiter.check("a", t0).is_err());
    assert!(
        limiter.check("b", t0).is_ok(),
        "another caller is not affected"
    );
    let off = RateLimiter::new(
        Rate {
            per_sec: 0.0,
            burst: 0.0,
        },
        1,
    );
    for _ in 0..100 {
        assert!(off.check("a", t0).is_ok());
    }
}

#[test]
fn rate_limiter_stays_within_its_key_bound() {
    let limiter = RateLimiter::new(RATE, 10);
    let t0 = Instant::now();
    for i in 0..1000 {
        assert!(limiter.check(&format!("k{i}"), t0).is_ok());
    }
    assert!(limiter.buckets.lock().unwrap().len() <= 10);
}

const LIMITS: AdmissionLimits = AdmissionLimits {
    max_in_flight: 4,
    max_renewals_in_flight: 2,
    max_queued: 3,
    max_wait: Duration::from_secs(5),
};

fn occ(in_flight: usize, renewals: usize, first_q: usize, renewals_q: usize) -> Occupancy {
    Occupancy {
        in_flight,
        renewals_in_flight: renewals,
        first_queued: first_q,
        renewals_queued: renewals_q,
    }
}

#[test]
fn only_a_caller_renewing_itself_with_its_certificate_is_a_renewal() {
    assert_eq!(renewal_lane(true, false), Lane::Renewal);
    assert_eq!(
        renewal_lane(true, true),
        Lane::First,
        "a node agent for a workload"
    );
    assert_eq!(renewal_lane(false, false), Lane::First);
}

#[test]
fn arrivals_start_queue_or_are_refused() {
    use Arrival::*;
    assert_eq!(on_arrival(Lane::First, &occ(0, 0, 0, 0), &LIMITS), Start);
    assert_eq!(on_arrival(Lane::First, &occ(4, 0, 0, 0), &LIMITS), Queue);
    assert_eq!(on_arrival(Lane::First, &occ(4, 0, 2, 1), &LIMITS), Refuse);
    // Renewals keep within their share, leaving room for first issuances.
    assert_eq!(on_arrival(Lane::Renewal, &occ(2, 2, 0, 0), &LIMITS), Queue);
    assert_eq!(on_arrival(Lane::First, &occ(2, 2, 0, 0), &LIMITS), Start);
    // Nobody overtakes a waiting first issuance; a first issuance overtakes renewals.
    assert_eq!(on_arrival(Lane::Renewal, &occ(3, 0, 1, 0), &LIMITS), Queue);
    assert_eq!(on_arrival(Lane::First, &occ(2, 2, 0, 1), &LIMITS), Start);
}

#[test]
fn first_issuance_is_admitted_before_renewals_under_pressure() {
    // Full, a renewal waiting since before a first issuance: the first issuance goes first.
    assert_eq!(next_to_start(&occ(3, 1, 1, 1), &LIMITS), Some(Lane::First));
    assert_eq!(
        next_to_start(&occ(3, 1, 0, 1), &LIMITS),
        Some(Lane::Renewal)
    );
    // A renewal never takes the permits kept for first issuances.
    assert_eq!(next_to_start(&occ(2, 2, 0, 1), &LIMITS), None);
    assert_eq!(next_to_start(&occ(4, 0, 1, 0), &LIMITS), None);
}

#[tokio::test(start_paused = true)]
async fn permits_are_handed_to_first_issuances_before_renewals() {
    let limits = AdmissionLimits {
        max_in_flight: 1,
        max_renewals_in_flight: 1,
        max_queued: 10,
        max_wait: Duration::from_secs(60),
    };
    let admission = Admission::new(limits);
    let running = admission.admit(Lane::First).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    // The renewal arrives first, the first issuance after it.
    for (lane, name) in [(Lane::Renewal, "renewal"), (Lane::First, "first")] {
        let (a, order) = (admission.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let permit = a.admit(lane).await.unwrap();
            order.lock().unwrap().push(name);
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(permit);
        }));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(admission.occupancy(), occ(1, 0, 1, 1));
    drop(running);
    for w in waiters {
        w.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec!["first", "renewal"]);
    assert_eq!(admission.occupancy(), Occupancy::default());
}

#[tokio::test(start_paused = true)]
async fn a_waiter_gives_up_after_max_wait_and_leaves_no_slot_behind() {
    let limits = AdmissionLimits {
        max_in_flight: 1,
        max_renewals_in_flight: 1,
        max_queued: 1,
        max_wait: Duration::from_secs(2),
    };
    let admission = Admission::new(limits);
    let running = admission.admit(Lane::First).await.unwrap();
    let waiting = {
        let a = admission.clone();
        tokio::spawn(async move { a.admit(Lane::First).await.map(drop) })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(matches!(
        admission.admit(Lane::First).await,
        Err(Overloaded::QueueFull(1))
    ));
    assert_eq!(
        waiting.await.unwrap(),
        Err(Overloaded::Timeout(Duration::from_secs(2)))
    );
    drop(running);
    assert_eq!(admission.occupancy(), Occupancy::default());
    drop(admission.admit(Lane::First).await.unwrap());
}
