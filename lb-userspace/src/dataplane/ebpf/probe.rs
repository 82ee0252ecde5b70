//! The kernel side of `target = "vip"` health probes: `xlb_probe` on the probe namespace's
//! veth (generic mode: it redirects to the balanced interface, whose driver need not take
//! redirected frames natively) and `PROBE`, which tells the balancer where replies go.

use aya::programs::{TestRun, TestRunOptions, XdpMode};
use lb_common::ProbeConf;

use super::{link::program_mut, EbpfDataplane, EbpfError};
use crate::dataplane::DataplaneError;

fn prog_err(e: EbpfError) -> DataplaneError {
    DataplaneError::Map {
        op: "attach",
        map: lb_common::PROG_PROBE,
        source: std::io::Error::other(e.to_string()),
    }
}

impl EbpfDataplane {
    /// Load `xlb_probe` (once; only the balancer is loaded at start).
    fn probe_program(&mut self) -> Result<&mut aya::programs::Xdp, EbpfError> {
        let prog = program_mut(&mut self.ebpf, lb_common::PROG_PROBE)?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| EbpfError::Program {
                name: lb_common::PROG_PROBE,
                source,
            })?;
        }
        Ok(prog)
    }

    /// Write `PROBE[0]` (tests set it without a namespace).
    pub fn set_probe_conf(&mut self, conf: &ProbeConf) -> Result<(), DataplaneError> {
        self.probe
            .set(0, *conf, 0)
            .map_err(|e| self.dp_err("update", lb_common::MAP_PROBE, e))
    }

    /// Run `xlb_probe` once on `frame` (BPF_PROG_TEST_RUN): the action and the output frame.
    pub fn test_run_probe(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), EbpfError> {
        let mut out = vec![0u8; frame.len() + 256];
        let res = self
            .probe_program()?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .map_err(|source| EbpfError::Program {
                name: lb_common::PROG_PROBE,
                source,
            })?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    pub(super) fn enable_probes_impl(&mut self, conf: &ProbeConf) -> Result<(), DataplaneError> {
        if self.probe_link.is_none() {
            let prog = self.probe_program().map_err(prog_err)?;
            let id = prog
                .attach_to_if_index(conf.veth_ifindex, XdpMode::Skb)
                .map_err(|source| {
                    prog_err(EbpfError::Attach {
                        iface: format!("ifindex {}", conf.veth_ifindex),
                        source,
                    })
                })?;
            self.probe_link = Some(id);
        }
        self.set_probe_conf(conf)
    }

    pub(super) fn disable_probes_impl(&mut self) -> Result<(), DataplaneError> {
        self.set_probe_conf(&ProbeConf::default())?;
        if let Some(id) = self.probe_link.take() {
            if let Ok(prog) = program_mut(&mut self.ebpf, lb_common::PROG_PROBE) {
                // The veth may be gone already (its namespace ended): nothing to detach then.
                let _ = prog.detach(id);
            }
        }
        Ok(())
    }
}
