//! A small blocking HTTP client for the demo, on `ureq`: one new connection per request,
//! so that round-robin hand-off is visible.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use testkit::WorkerInfo;

#[derive(Debug, Clone)]
pub(crate) struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub(crate) fn new(addr: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .max_idle_connections(0)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into();
        Self {
            base: format!("http://{addr}"),
            agent,
        }
    }

    /// `GET path`: the status and the body.
    pub(crate) fn get(&self, path: &str) -> Result<(u16, String)> {
        let (status, _, body) = self.get_with_headers(path)?;
        Ok((status, body))
    }

    /// `GET path`: the status, the headers (lower-case names) and the body.
    pub(crate) fn get_with_headers(
        &self,
        path: &str,
    ) -> Result<(u16, HashMap<String, String>, String)> {
        let mut response = self
            .agent
            .get(&format!("{}{path}", self.base))
            .call()
            .with_context(|| format!("GET {path}"))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let body = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the body of GET {path}"))?;
        Ok((status, headers, body))
    }

    /// `GET /worker`, parsed.
    pub(crate) fn worker(&self) -> Result<WorkerInfo> {
        let (status, body) = self.get("/worker")?;
        ensure!(status == 200, "GET /worker answered {status}");
        parse_worker(&body).with_context(|| format!("unexpected /worker body {body:?}"))
    }
}

/// Parses `{"id": N, "pid": P}`.
fn parse_worker(body: &str) -> Option<WorkerInfo> {
    WorkerInfo::from_json(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_worker_body() {
        assert_eq!(
            parse_worker("{\"id\": 4, \"pid\": 1234}\n"),
            Some(WorkerInfo { id: 4, pid: 1234 })
        );
        assert_eq!(parse_worker("{\"id\": 4}"), None);
    }
}
