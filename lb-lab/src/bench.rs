//! The benchmark wrapper (`xlb-bench` object): BPF_PROG_TEST_RUN reruns the buffer the
//! previous iteration rewrote, so the wrapper restores a template frame before every iteration
//! (varying 4 bytes of it when asked) and tail-calls the balancer, or a program that returns
//! at once to measure the wrapper's own cost.

use anyhow::{anyhow, ensure, Context, Result};
use aya::{
    maps::{Array, MapData, ProgramArray},
    programs::{ProgramFd, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{BenchFrame, BENCH_FRAME_MAX};
use lb_userspace::dataplane::ebpf::EbpfDataplane;

/// The wrapper's object, built by `cargo xtask build`.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_BENCH_OBJECT"));

/// What the wrapper varies between iterations (4 bytes at `off`: an IPv4 source address, or
/// the last word of an IPv6 one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vary {
    /// The same frame every time: one established flow.
    None,
    /// A value never used before: a new flow every iteration.
    NewFlows { off: u32 },
    /// Values 1..=flows in turn: `flows` established flows visited round robin.
    Cycle { off: u32, flows: u32 },
}

pub struct Bench {
    ebpf: Ebpf,
    frame: Array<MapData, BenchFrame>,
    progs: ProgramArray<MapData>,
    balancer: ProgramFd,
    baseline: ProgramFd,
    /// The next never-used value for `Vary::NewFlows`.
    counter: u32,
    /// The interface the frames come in by (`xdp_md.ingress_ifindex`), for paths that look
    /// up routes from it; none: the loopback.
    ingress: Option<u32>,
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} is missing"))?
        .try_into()
        .with_context(|| format!("program {name} is not XDP"))
}

impl Bench {
    /// Load the wrapper for the balancer of `dp`.
    pub fn new(dp: &mut EbpfDataplane) -> Result<Bench> {
        Bench::for_program(dp.program_fd()?)
    }

    /// The wrapper around any XDP program (another build, another balancer measured the same
    /// way).
    pub fn for_program(balancer: ProgramFd) -> Result<Bench> {
        let mut ebpf = EbpfLoader::new()
            .load(BENCH_OBJECT)
            .context("loading the benchmark object")?;
        for name in [lb_common::PROG_BENCH, lb_common::PROG_BENCH_BASELINE] {
            program(&mut ebpf, name)?
                .load()
                .with_context(|| format!("loading {name}"))?;
        }
        let baseline = program(&mut ebpf, lb_common::PROG_BENCH_BASELINE)?
            .fd()?
            .try_clone()?;
        let frame = ebpf
            .take_map(lb_common::MAP_BENCH_FRAME)
            .context("map BENCH_FRAME")?
            .try_into()?;
        let progs = ebpf
            .take_map(lb_common::MAP_BENCH_PROGS)
            .context("map BENCH_PROGS")?
            .try_into()?;
        Ok(Bench {
            balancer,
            ebpf,
            frame,
            progs,
            baseline,
            counter: 1,
            ingress: None,
        })
    }

    /// Frames come in by interface `ifindex` (of this thread's network namespace).
    pub fn on_ingress(mut self, ifindex: Option<u32>) -> Bench {
        self.ingress = ifindex;
        self
    }

    pub(crate) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Write the template (varied as `vary` says) and the tail-call target (the baseline
    /// with `baseline`, else the balancer).
    pub(crate) fn prepare(&mut self, frame: &[u8], vary: Vary, baseline: bool) -> Result<()> {
        let (vary_off, counter, vary_cycle) = match vary {
            Vary::None => (0, 0, 0),
            // Never restart the counter: a reused value would be a tracked flow again.
            Vary::NewFlows { off } => (off, self.counter, 0),
            Vary::Cycle { off, flows } => (off, 1, flows),
        };
        ensure!(
            frame.len() <= BENCH_FRAME_MAX,
            "frame of {} bytes does not fit the benchmark template",
            frame.len()
        );
        let mut tmpl = BenchFrame {
            len: frame.len() as u32,
            vary_off,
            counter,
            vary_cycle,
            data: [0; BENCH_FRAME_MAX],
        };
        tmpl.data[..frame.len()].copy_from_slice(frame);
        self.frame.set(0, tmpl, 0).context("writing BENCH_FRAME")?;
        let target = if baseline {
            &self.baseline
        } else {
            &self.balancer
        };
        self.progs
            .set(0, target, 0)
            .context("writing BENCH_PROGS")?;
        Ok(())
    }

    pub(crate) fn wrapper(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf, lb_common::PROG_BENCH)
    }

    /// After a run of `repeat` iterations: new flows' values are used up.
    pub(crate) fn advance(&mut self, vary: Vary, repeat: u32) {
        if matches!(vary, Vary::NewFlows { .. }) {
            self.counter = self.counter.wrapping_add(repeat);
        }
    }

    /// Run `repeat` iterations on `frame` (tail-calling the baseline instead of the balancer
    /// with `baseline`): the action of the last one and the kernel's mean ns per iteration.
    pub fn run(
        &mut self,
        frame: &[u8],
        vary: Vary,
        repeat: u32,
        baseline: bool,
    ) -> Result<(u32, f64)> {
        self.prepare(frame, vary, baseline)?;
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...; the kernel wants
        // data_end to be the frame's length.
        let mut md = [0u8; 24];
        md[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        if let Some(ifindex) = self.ingress {
            md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        }
        let ingress = self.ingress;
        let res = self
            .wrapper()?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ingress.map(|_| &md[..]),
                repeat,
                ..TestRunOptions::new()
            })
            .map_err(|e| anyhow!("BPF_PROG_TEST_RUN of {}: {e}", lb_common::PROG_BENCH))?;
        self.advance(vary, repeat);
        // The kernel reports the mean duration per iteration.
        Ok((res.return_value, res.duration.as_nanos() as f64))
    }
}

/// Run `f` with the calling thread allowed on every CPU but `cpu`, then pin it to `cpu` again:
/// threads `f` starts (the dataplane's tuple-log drainer) inherit that affinity, so they never
/// share the measured CPU. With a single CPU, `f` runs pinned.
pub fn off_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> Result<T> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    if online > 1 {
        // SAFETY: as in `pin_to_cpu`.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for c in (0..online).filter(|c| *c != cpu) {
                libc::CPU_SET(c, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("leaving the measured CPU to start a thread");
            }
        }
    }
    let out = f();
    pin_to_cpu(cpu)?;
    Ok(out)
}

/// Pin the calling thread to one CPU (BPF_F_TEST_RUN_ON_CPU is refused for XDP).
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}
