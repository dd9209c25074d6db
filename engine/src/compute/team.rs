//! Fork-join for the parallel loops inside one model step, with helpers that spin.
//!
//! A step of the LM runs about a hundred parallel products (and the attention heads)
//! with a few microseconds of serial work between them. Under rayon alone, a worker that
//! finds no job for a few tens of microseconds goes to sleep, and every product then
//! wakes it with a futex call (an inter-processor interrupt through the hypervisor on a
//! VM): measured on the 2-core Xeon VM, the 2-thread q4 step spent about a tenth of its
//! samples waking and sleeping, and took 25 ms where two single-thread steps run side by
//! side in separate processes take 42 ms each, so the split itself cost 4 ms. llama.cpp's
//! CPU back end spins its threads on a barrier for the same reason; no well-kept crate
//! offers a scoped pool whose workers spin for a bounded time (rayon's sleep policy is
//! fixed), hence this module.
//!
//! [`session`] (what `cpu::on_pool` runs a step in) keeps rayon's other workers in a
//! spinning helper loop for the duration of the step (they still run rayon jobs that
//! show up meanwhile, so candle's own parallel loops inside a step keep working); inside
//! it, [`chunks_mut`] hands the chunks of a loop out one at a time to whichever thread
//! asks first, the caller included, and returns when every chunk is done. Outside a
//! session it is rayon's `par_chunks_mut`. A loop started while another runs on the
//! same session (a nested one) runs on its caller alone. Sessions from different threads
//! take turns (a helper looking for rayon work would otherwise run a whole other session
//! nested in its loop, each then waiting on the other's length); one started inside a
//! session runs as part of it.

use std::cell::RefCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use rayon::prelude::*;

thread_local! {
    /// The session whose steps this thread runs (set by [`session`] on its caller).
    static SESSION: RefCell<Option<Arc<Team>>> = const { RefCell::new(None) };
    /// This thread is a session's helper (a session started from inside one runs as part
    /// of it).
    static HELPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// One session at a time in the process: a helper looking for rayon work would otherwise
/// run another thread's whole session nested inside its loop, and the two would wait on
/// each other's length (the pipeline's stages call [`session`] from their own threads).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Chunks a loop may have (they are counted in 16 bits of the job word).
const MAX_PARTS: usize = u16::MAX as usize;

/// Spin iterations between two looks for rayon jobs in a helper.
const SPINS_PER_YIELD: u32 = 32;

struct Team {
    /// The job word: sequence number (32 bits), chunk count (16), next chunk (16).
    state: AtomicU64,
    /// The running job's body (valid while its chunks are not all done).
    job: Mutex<Option<erased::Body>>,
    /// Chunks of the running job finished.
    done: AtomicUsize,
    /// A loop is running (a nested one runs alone).
    busy: AtomicBool,
    /// The session is over: helpers return.
    stop: AtomicBool,
    /// The thread the session's step runs on (it never helps itself).
    owner: ThreadId,
    /// A chunk's panic, resumed on the caller.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

fn pack(seq: u32, parts: usize, next: usize) -> u64 {
    (u64::from(seq) << 32) | ((parts as u64) << 16) | next as u64
}

fn unpack(word: u64) -> (u32, usize, usize) {
    (
        (word >> 32) as u32,
        ((word >> 16) & 0xFFFF) as usize,
        (word & 0xFFFF) as usize,
    )
}

impl Team {
    /// Claims the next chunk of the running job, if any is left.
    fn claim(&self) -> Option<usize> {
        let mut word = self.state.load(Ordering::Acquire);
        loop {
            let (_, parts, next) = unpack(word);
            if next >= parts {
                return None;
            }
            match self.state.compare_exchange_weak(
                word,
                word + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(next),
                Err(w) => word = w,
            }
        }
    }

    /// Runs claimed chunk `i` of the running job and counts it done (a panic is kept for
    /// the caller: the count must reach the total either way).
    fn run_claimed(&self, i: usize) {
        let body = self
            .job
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expect("a claimed chunk has a body");
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| body.call(i))) {
            *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
        self.done.fetch_add(1, Ordering::Release);
    }

    /// Runs `f(0..parts)` across the team; returns when all are done.
    fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        let (seq, _, _) = unpack(self.state.load(Ordering::Acquire));
        *self.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(erased::Body::new(f));
        self.done.store(0, Ordering::Relaxed);
        self.state
            .store(pack(seq.wrapping_add(1), parts, 0), Ordering::Release);
        while let Some(i) = self.claim() {
            self.run_claimed(i);
        }
        // Chunks other threads claimed: wait for them before `f` goes out of scope.
        let mut spins = 0u32;
        while self.done.load(Ordering::Acquire) < parts {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        *self.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(p) = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(p);
        }
    }

    /// A helper's loop: takes chunks until the session stops, running any rayon job that
    /// turns up while there are none.
    fn help(&self) {
        if std::thread::current().id() == self.owner {
            // The step's own thread popped this helper from its deque (while waiting in a
            // rayon join): helping would wait for the step it sits inside.
            return;
        }
        HELPING.with(|h| h.set(true));
        /// Clears the mark however the loop ends.
        struct Done;
        impl Drop for Done {
            fn drop(&mut self) {
                HELPING.with(|h| h.set(false));
            }
        }
        let _done = Done;
        let mut spins = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            if let Some(i) = self.claim() {
                self.run_claimed(i);
                spins = 0;
                continue;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(SPINS_PER_YIELD) {
                // Nothing of rayon's to run either: let the OS run another thread here if
                // one waits (an LLM beside a cascade's models), as a sleeping worker would.
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::thread::yield_now();
                }
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

#[allow(unsafe_code)]
mod erased {
    //! The loop body as a pointer without its lifetime, so the helpers (which outlive any
    //! one loop) can hold it. `unsafe` is allowed here for two things: erasing that
    //! lifetime, and calling through the pointer, which happens only for a chunk claimed
    //! from the job word of the loop that stored it; that loop's caller does not return
    //! (nor unwind: chunk panics are caught) before every claimed chunk is counted done,
    //! so the body outlives every call.

    #[derive(Clone, Copy)]
    pub(super) struct Body(*const (dyn Fn(usize) + Sync + 'static));

    // SAFETY: the pointee is `Sync` (callable from any thread) and outlives every use (the
    // module's notes).
    unsafe impl Send for Body {}

    impl Body {
        pub(super) fn new(f: &(dyn Fn(usize) + Sync)) -> Self {
            let p: *const (dyn Fn(usize) + Sync + '_) = f;
            // SAFETY: only the lifetime changes (same layout); see the module's notes for
            // why the pointer is never used past it.
            Self(unsafe {
                std::mem::transmute::<
                    *const (dyn Fn(usize) + Sync + '_),
                    *const (dyn Fn(usize) + Sync + 'static),
                >(p)
            })
        }

        pub(super) fn call(self, i: usize) {
            // SAFETY: called only for a claimed chunk of a running loop (module notes).
            unsafe { (*self.0)(i) }
        }
    }
}

/// Runs `f` as one step with the rest of rayon's workers spinning beside it (the loops
/// of [`chunks_mut`] inside `f` are shared with them). `f` runs on a rayon worker. Sessions
/// from different threads take turns; one started inside another (on its thread or a
/// helper's) runs as part of it.
pub fn session<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if SESSION.with(|s| s.borrow().is_some()) || HELPING.with(|h| h.get()) {
        return f();
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let threads = rayon::current_num_threads();
    rayon::scope(|s| {
        if threads < 2 {
            return f();
        }
        let team = Arc::new(Team {
            state: AtomicU64::new(0),
            job: Mutex::new(None),
            done: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            owner: std::thread::current().id(),
            panic: Mutex::new(None),
        });
        for _ in 1..threads {
            let t = Arc::clone(&team);
            s.spawn(move |_| t.help());
        }
        /// Ends the session however `f` returns (a panic included), so the helpers stop
        /// and the scope can finish.
        struct End(Arc<Team>, Option<Arc<Team>>);
        impl Drop for End {
            fn drop(&mut self) {
                self.0.stop.store(true, Ordering::Release);
                let previous = self.1.take();
                SESSION.with(|s| *s.borrow_mut() = previous);
            }
        }
        let previous = SESSION.with(|s| s.borrow_mut().replace(Arc::clone(&team)));
        let _end = End(team, previous);
        f()
    })
}

/// `f(i, chunk)` for every `chunk`-long piece of `data` (the last may be shorter), in
/// parallel: shared with the session's spinning helpers inside [`session`], by rayon
/// outside one, on the caller alone when this is nested in another loop of the session.
pub fn chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let team = SESSION.with(|s| s.borrow().clone());
    let Some(team) = team else {
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
        return;
    };
    let parts = data.len().div_ceil(chunk);
    if parts <= 1 || parts > MAX_PARTS || team.busy.swap(true, Ordering::Acquire) {
        data.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
        return;
    }
    /// Frees the team for the next loop however this one ends.
    struct Free<'a>(&'a Team);
    impl Drop for Free<'_> {
        fn drop(&mut self) {
            self.0.busy.store(false, Ordering::Release);
        }
    }
    let _free = Free(&team);
    // Each chunk is taken exactly once (the job word hands every index out once); the
    // mutex only makes that visible to the compiler.
    let pieces: Vec<Mutex<&mut [T]>> = data.chunks_mut(chunk).map(Mutex::new).collect();
    team.run(parts, &|i| {
        let mut piece = pieces[i].lock().unwrap_or_else(|e| e.into_inner());
        f(i, &mut piece)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool")
    }

    /// Every chunk once, with its own index, inside and outside a session, on 1-3 threads.
    #[test]
    fn every_chunk_runs_once_with_its_index() {
        for threads in [1, 2, 3] {
            pool(threads).install(|| {
                for len in [0, 1, 5, 64, 1000, 4097] {
                    for chunk in [1, 3, 64, 5000] {
                        let check = |data: &mut Vec<usize>| {
                            chunks_mut(data, chunk, |i, c| {
                                for (k, v) in c.iter_mut().enumerate() {
                                    *v += i * chunk + k + 1;
                                }
                            });
                            let want: Vec<usize> = (1..=len).collect();
                            assert_eq!(*data, want, "len {len} chunk {chunk} threads {threads}");
                        };
                        check(&mut vec![0; len]);
                        session(|| {
                            // Many loops in one session, as a step runs them.
                            for _ in 0..50 {
                                check(&mut vec![0; len]);
                            }
                        });
                    }
                }
            });
        }
    }

    /// A loop inside a chunk of another runs on its caller; rayon jobs inside a session
    /// still run; the session's helpers stop when it ends.
    #[test]
    fn nested_loops_and_rayon_jobs_inside_a_session() {
        pool(2).install(|| {
            let total = session(|| {
                let mut outer = vec![0u64; 8];
                chunks_mut(&mut outer, 1, |i, c| {
                    let mut inner = vec![0u64; 100];
                    chunks_mut(&mut inner, 7, |j, d| {
                        d.iter_mut().for_each(|v| *v = j as u64)
                    });
                    let par: u64 = (0..1000u64).into_par_iter().sum();
                    c[0] = inner.iter().sum::<u64>() + par + i as u64;
                });
                outer.iter().sum::<u64>()
            });
            let inner: u64 = (0..100u64).map(|k| k / 7).sum();
            assert_eq!(total, 8 * (inner + 499_500) + 28);
        });
    }

    /// Sessions started from several threads at once take turns and each gets its own
    /// results (the pipeline's stages do this); one started inside a chunk runs in place.
    #[test]
    fn sessions_from_several_threads_take_turns() {
        let p = pool(2);
        std::thread::scope(|scope| {
            for seed in 0..3usize {
                let p = &p;
                scope.spawn(move || {
                    for round in 0..20usize {
                        let got = p.install(|| {
                            session(|| {
                                let mut d = vec![0usize; 257];
                                chunks_mut(&mut d, 16, |i, c| {
                                    let inner = session(|| i + seed);
                                    c.iter_mut().for_each(|v| *v = inner + round);
                                });
                                d
                            })
                        });
                        for (k, v) in got.iter().enumerate() {
                            assert_eq!(*v, k / 16 + seed + round);
                        }
                    }
                });
            }
        });
    }

    /// A panic in a chunk reaches the caller, and the session and pool stay usable.
    #[test]
    fn a_panicking_chunk_reaches_the_caller() {
        pool(2).install(|| {
            let r = std::panic::catch_unwind(|| {
                session(|| {
                    let mut d = vec![0u8; 64];
                    chunks_mut(&mut d, 1, |i, _| assert!(i != 40, "chunk 40"));
                })
            });
            assert!(r.is_err());
            let mut d = vec![0u8; 64];
            session(|| chunks_mut(&mut d, 1, |_, c| c[0] = 1));
            assert!(d.iter().all(|&v| v == 1));
        });
    }
}
