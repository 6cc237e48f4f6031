//! The collectives for real: two ranks (threads of this process) meet through a
//! TCPStore on loopback and reduce and broadcast over Gloo, as two processes would.

use std::time::{Duration, Instant};

use ddpm_dist::{GlooInterface, ProcessGroup, Store};
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(20);

/// One torch thread, set once before any test runs an op: changing libtorch's thread
/// count while another test's op runs in the pool is a crash waiting to happen.
fn one_thread() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tch::set_num_threads(1));
}

/// Runs `body(rank, group, store)` on two ranks over loopback and returns what each
/// returned.
fn two_ranks<T: Send + 'static>(
    body: impl Fn(usize, &ProcessGroup, &Store) -> T + Send + Sync + 'static,
) -> Vec<T> {
    two_ranks_on(GlooInterface::Hostname("127.0.0.1".into()), body)
}

/// [`two_ranks`] with Gloo bound to `interface`.
fn two_ranks_on<T: Send + 'static>(
    interface: GlooInterface,
    body: impl Fn(usize, &ProcessGroup, &Store) -> T + Send + Sync + 'static,
) -> Vec<T> {
    one_thread();
    let server = Store::serve("127.0.0.1", 0, 2, TIMEOUT).unwrap();
    let port = server.port();
    assert!(port > 0, "the store bound a port");
    let body = std::sync::Arc::new(body);
    let join = |store: &Store, rank: usize, interface: &GlooInterface| {
        ProcessGroup::new(store, rank, 2, Device::Cpu, interface, TIMEOUT).unwrap()
    };
    let other = {
        let (body, interface) = (body.clone(), interface.clone());
        std::thread::spawn(move || {
            let store = Store::connect("127.0.0.1", port, 2, TIMEOUT).unwrap();
            let group = join(&store, 1, &interface);
            body(1, &group, &store)
        })
    };
    let group = join(&server, 0, &interface);
    let mine = body(0, &group, &server);
    vec![mine, other.join().unwrap()]
}

#[test]
fn all_reduce_sums_every_ranks_tensor_in_place() {
    let results = two_ranks(|rank, group, _| {
        // Rank r holds (r + 1) · [1, 2, 3, 4]: the sum is 3 · [1, 2, 3, 4] on both.
        let mut t = Tensor::from_slice(&[1f32, 2., 3., 4.]) * (rank as f64 + 1.0);
        group.all_reduce_sum(&mut t).unwrap();
        Vec::<f32>::try_from(&t).unwrap()
    });
    assert_eq!(results[0], vec![3., 6., 9., 12.]);
    assert_eq!(results[1], results[0]);
}

#[test]
fn broadcast_gives_every_rank_the_roots_tensor() {
    let results = two_ranks(|rank, group, _| {
        let mut t = Tensor::full(
            [1000],
            rank as f64 * 10.0 + 7.0,
            (Kind::Double, Device::Cpu),
        );
        group.broadcast(&mut t, 0).unwrap();
        let mut u = Tensor::full([3], rank as f64, (Kind::Int64, Device::Cpu));
        group.broadcast(&mut u, 1).unwrap();
        (
            t.sum(Kind::Double).double_value(&[]),
            Vec::<i64>::try_from(&u).unwrap(),
        )
    });
    for (sum, u) in results {
        assert_eq!(sum, 7000.0);
        assert_eq!(u, vec![1, 1, 1]);
    }
}

#[test]
fn the_store_carries_bytes_between_ranks_under_a_prefix() {
    let results = two_ranks(|rank, _, store| {
        let view = store.prefixed("attempt_3").unwrap();
        if rank == 0 {
            view.set("job", b"{\"run\":7}").unwrap();
            view.set("empty", b"").unwrap();
        }
        (view.get("job").unwrap(), view.get("empty").unwrap())
    });
    for (job, empty) in results {
        assert_eq!(job, b"{\"run\":7}");
        assert!(empty.is_empty());
    }
}

#[test]
fn a_collective_on_a_tensor_of_another_device_or_layout_is_refused() {
    let results = two_ranks(|_, group, _| {
        let mut strided = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).tr();
        let err = group.all_reduce_sum(&mut strided).unwrap_err().to_string();
        // Both ranks refuse before calling into c10d: the group is still usable.
        let mut ok = Tensor::ones([2], (Kind::Float, Device::Cpu));
        group.all_reduce_sum(&mut ok).unwrap();
        (err, Vec::<f32>::try_from(&ok).unwrap())
    });
    for (err, ok) in results {
        assert!(err.contains("contiguous"), "{err}");
        assert_eq!(ok, vec![2., 2.]);
    }
}

#[test]
fn a_store_nobody_serves_is_a_clear_error_within_the_timeout() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let err = Store::connect("127.0.0.1", port, 2, Duration::from_secs(2)).unwrap_err();
    let waited = started.elapsed();
    assert!(
        err.to_string()
            .contains("connecting to the rendezvous store"),
        "{err}"
    );
    assert!(waited < Duration::from_secs(15), "gave up after {waited:?}");
}

#[test]
fn a_key_nobody_sets_is_a_clear_error_within_the_timeout() {
    // How the trainer notices a rank that never comes: its key never appears in the
    // store (it builds the group only once every rank's key is there).
    let store = Store::serve("127.0.0.1", 0, 2, Duration::from_secs(2)).unwrap();
    let started = Instant::now();
    let err = store.get("device/1").unwrap_err();
    assert!(
        err.to_string()
            .contains("reading from the rendezvous store"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Rank 0 of two joining alone on `interface` with a 2 s timeout: the error it gets,
/// after how long.
fn join_alone(interface: GlooInterface) -> (String, Duration) {
    one_thread();
    let timeout = Duration::from_secs(2);
    let store = Store::serve("127.0.0.1", 0, 2, timeout).unwrap();
    let started = Instant::now();
    let err = ProcessGroup::new(&store, 0, 2, Device::Cpu, &interface, timeout).unwrap_err();
    (err.to_string(), started.elapsed())
}

#[test]
fn a_rank_that_never_comes_is_a_clear_error_within_the_timeout() {
    let (err, waited) = join_alone(GlooInterface::Hostname("127.0.0.1".into()));
    assert!(err.contains("joining the process group"), "{err}");
    assert!(waited < Duration::from_secs(15));
}

#[test]
fn a_gloo_rank_binds_the_interface_it_is_given() {
    // Loopback by interface name, as GLOO_SOCKET_IFNAME=lo would ask.
    let sums = two_ranks_on(GlooInterface::Interface("lo".into()), |rank, group, _| {
        let mut t = Tensor::from_slice(&[rank as f32 + 1.0]);
        group.all_reduce_sum(&mut t).unwrap();
        t.double_value(&[0])
    });
    assert_eq!(sums, [3.0, 3.0]);
    // An interface that does not exist is an error, not a crash.
    let (err, _) = join_alone(GlooInterface::Interface("no-such-if0".into()));
    assert!(err.contains("joining the process group"), "{err}");
}
