//! A rank's place in the world, read from the environment `torchrun` sets (a Kubernetes
//! PyTorchJob runs torchrun in each pod, and ddpm's own launcher sets the same
//! variables): `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`, and torchelastic's `TORCHELASTIC_RESTART_COUNT`, `TORCHELASTIC_RUN_ID`
//! and `TORCHELASTIC_USE_AGENT_STORE`.

use std::time::Duration;

use crate::{
    error::{DistError, Result},
    group::GlooInterface,
    store::Store,
};

/// One rank's launch description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// 0..world_size; rank 0 is the one that talks to the registry and the store.
    pub rank: usize,
    /// Index among the ranks of this host: which GPU it takes.
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    /// Where the rendezvous store listens.
    pub master_addr: String,
    pub master_port: u16,
    /// How many times torchrun restarted the workers (0 on the first attempt).
    pub restart_count: u64,
    /// torchrun's rendezvous run id: the same across its restarts of one job.
    pub run_id: Option<String>,
    /// torchrun's agent already serves the store on `MASTER_PORT`: every rank is a
    /// client. Otherwise rank 0 serves it.
    pub agent_store: bool,
}

/// The variable names, in one place.
pub mod vars {
    pub const RANK: &str = "RANK";
    pub const LOCAL_RANK: &str = "LOCAL_RANK";
    pub const WORLD_SIZE: &str = "WORLD_SIZE";
    pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
    pub const MASTER_ADDR: &str = "MASTER_ADDR";
    pub const MASTER_PORT: &str = "MASTER_PORT";
    pub const RESTART_COUNT: &str = "TORCHELASTIC_RESTART_COUNT";
    pub const RUN_ID: &str = "TORCHELASTIC_RUN_ID";
    pub const USE_AGENT_STORE: &str = "TORCHELASTIC_USE_AGENT_STORE";
}

impl Launch {
    /// The launch this process is part of; `None` when `RANK` and `WORLD_SIZE` are both
    /// unset (a plain single process).
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Launch::from_env`] over any variable lookup (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        if var(vars::RANK).is_none() && var(vars::WORLD_SIZE).is_none() {
            return Ok(None);
        }
        let required = |name: &str| {
            var(name).ok_or_else(|| {
                DistError::Launch(format!(
                    "{name} is not set (RANK and WORLD_SIZE are: a launcher sets all of \
                     RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
                ))
            })
        };
        let number = |name: &str, value: String| -> Result<u64> {
            value.trim().parse().map_err(|_| {
                DistError::Launch(format!("{name}={value:?} is not a non-negative integer"))
            })
        };
        let rank = number(vars::RANK, required(vars::RANK)?)? as usize;
        let world_size = number(vars::WORLD_SIZE, required(vars::WORLD_SIZE)?)? as usize;
        // Without them (a PyTorchJob pod running one rank, no torchrun) a rank is alone on
        // its host: local rank 0 of 1, so it takes the pod's one GPU.
        let local_rank = match var(vars::LOCAL_RANK) {
            Some(v) => number(vars::LOCAL_RANK, v)? as usize,
            None => 0,
        };
        let local_world_size = match var(vars::LOCAL_WORLD_SIZE) {
            Some(v) => number(vars::LOCAL_WORLD_SIZE, v)? as usize,
            None => 1,
        };
        let master_addr = required(vars::MASTER_ADDR)?;
        let port = number(vars::MASTER_PORT, required(vars::MASTER_PORT)?)?;
        let master_port = u16::try_from(port)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| DistError::Launch(format!("MASTER_PORT={port} is not a TCP port")))?;
        let restart_count = match var(vars::RESTART_COUNT) {
            Some(v) => number(vars::RESTART_COUNT, v)?,
            None => 0,
        };
        let launch = Launch {
            rank,
            local_rank,
            world_size,
            local_world_size,
            master_addr,
            master_port,
            restart_count,
            run_id: var(vars::RUN_ID).filter(|id| !id.is_empty()),
            agent_store: var(vars::USE_AGENT_STORE)
                .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1"),
        };
        launch.check()?;
        Ok(Some(launch))
    }

    fn check(&self) -> Result<()> {
        if self.world_size == 0 {
            return Err(DistError::Launch("WORLD_SIZE is 0".into()));
        }
        if self.rank >= self.world_size {
            return Err(DistError::Launch(format!(
                "RANK={} is outside WORLD_SIZE={}",
                self.rank, self.world_size
            )));
        }
        if self.local_world_size == 0 || self.local_rank >= self.local_world_size {
            return Err(DistError::Launch(format!(
                "LOCAL_RANK={} is outside LOCAL_WORLD_SIZE={}",
                self.local_rank, self.local_world_size
            )));
        }
        if self.master_addr.is_empty() {
            return Err(DistError::Launch("MASTER_ADDR is empty".into()));
        }
        Ok(())
    }

    /// The variables a launcher sets for local rank `local_rank` of `n` ranks on one host
    /// whose store rank 0 serves on `port` (what ddpm's own launcher gives each child).
    pub fn local(local_rank: usize, n: usize, port: u16) -> Launch {
        Launch {
            rank: local_rank,
            local_rank,
            world_size: n,
            local_world_size: n,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            restart_count: 0,
            run_id: None,
            agent_store: false,
        }
    }

    /// This launch as environment variables (the inverse of [`Launch::from_vars`]).
    pub fn to_vars(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (vars::RANK, self.rank.to_string()),
            (vars::LOCAL_RANK, self.local_rank.to_string()),
            (vars::WORLD_SIZE, self.world_size.to_string()),
            (vars::LOCAL_WORLD_SIZE, self.local_world_size.to_string()),
            (vars::MASTER_ADDR, self.master_addr.clone()),
            (vars::MASTER_PORT, self.master_port.to_string()),
            (vars::RESTART_COUNT, self.restart_count.to_string()),
        ];
        if let Some(id) = &self.run_id {
            out.push((vars::RUN_ID, id.clone()));
        }
        out
    }

    /// Whether every rank is on this host behind loopback.
    pub fn is_loopback(&self) -> bool {
        self.master_addr == "localhost" || self.master_addr.starts_with("127.")
    }

    /// Where Gloo binds: loopback for a one-host launch on loopback; across hosts the
    /// interface `GLOO_SOCKET_IFNAME` names (torch's convention), else the address of this
    /// machine's hostname.
    pub fn gloo_interface(&self) -> GlooInterface {
        self.gloo_interface_with(std::env::var("GLOO_SOCKET_IFNAME").ok())
    }

    fn gloo_interface_with(&self, ifname: Option<String>) -> GlooInterface {
        if self.is_loopback() {
            return GlooInterface::Hostname("127.0.0.1".into());
        }
        match ifname.filter(|name| !name.is_empty()) {
            Some(name) => GlooInterface::Interface(name),
            None => GlooInterface::Default,
        }
    }

    /// The rendezvous store for this attempt, its keys prefixed by the restart count (the
    /// agent's store outlives restarts). Rank 0 serves it unless torchrun's agent does;
    /// connecting waits at most `timeout`.
    pub fn store(&self, timeout: Duration) -> Result<Store> {
        let base = if self.rank == 0 && !self.agent_store {
            Store::serve(
                &self.master_addr,
                self.master_port,
                self.world_size,
                timeout,
            )?
        } else {
            Store::connect(
                &self.master_addr,
                self.master_port,
                self.world_size,
                timeout,
            )?
        };
        base.prefixed(&format!("ddpm/attempt_{}", self.restart_count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(pairs: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn no_rank_variables_is_a_single_process() {
        assert_eq!(read(&[]).unwrap(), None);
    }

    #[test]
    fn torchrun_variables_are_read() {
        let launch = read(&[
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.5"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
            ("TORCHELASTIC_RUN_ID", "job-7"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((launch.rank, launch.local_rank), (3, 1));
        assert_eq!((launch.world_size, launch.local_world_size), (4, 2));
        assert_eq!(launch.restart_count, 2);
        assert_eq!(launch.run_id.as_deref(), Some("job-7"));
        assert!(launch.agent_store);
        assert!(!launch.is_loopback());
        assert_eq!(launch.gloo_interface_with(None), GlooInterface::Default);
        assert_eq!(
            launch.gloo_interface_with(Some("eth1".into())),
            GlooInterface::Interface("eth1".into())
        );
    }

    #[test]
    fn a_rank_without_local_variables_is_alone_on_its_host() {
        // A PyTorchJob pod that runs the binary itself: RANK is the pod's index.
        let launch = read(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "job-master-0"),
            ("MASTER_PORT", "23456"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((launch.local_rank, launch.local_world_size), (0, 1));
        assert_eq!((launch.restart_count, launch.run_id), (0, None));
        assert!(!launch.agent_store);
    }

    #[test]
    fn ddpm_launcher_variables_round_trip() {
        let launch = Launch::local(1, 2, 4321);
        let vars = launch.to_vars();
        let back = Launch::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        })
        .unwrap()
        .unwrap();
        assert_eq!(back, launch);
        assert_eq!(
            back.gloo_interface(),
            GlooInterface::Hostname("127.0.0.1".into())
        );
    }

    #[test]
    fn incomplete_or_contradictory_launches_are_refused_with_the_variable_named() {
        let err = read(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(err.to_string().contains("MASTER_ADDR"), "{err}");
        let base = [("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1234")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            read(&all).unwrap_err().to_string()
        };
        assert!(with(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("RANK=2"));
        assert!(with(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
        assert!(with(&[("RANK", "0"), ("WORLD_SIZE", "0")]).contains("WORLD_SIZE is 0"));
        assert!(read(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "70000")
        ])
        .unwrap_err()
        .to_string()
        .contains("MASTER_PORT"));
    }
}
