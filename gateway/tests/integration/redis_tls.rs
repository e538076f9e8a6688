//! Redis over TLS against a real `redis-server --tls-port` with a CA and certificates this test
//! generates (openssl): nodes connect with `rediss://` and `--redis-ca-file` plus a client
//! certificate (the server requires one), deliver across nodes, and refuse a server whose
//! certificate the CA did not sign.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use serde_json::json;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`{name}-ca.crt`) and a certificate `{leaf}.crt`/`.key` it signs for 127.0.0.1.
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}-ca.key"),
            "-out",
            &format!("{name}-ca.crt"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
        ],
    );
}

fn leaf(dir: &Path, ca: &str, leaf: &str) {
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{leaf}.key"),
            "-out",
            &format!("{leaf}.csr"),
            "-subj",
            &format!("/CN={leaf}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{leaf}.csr"),
            "-CA",
            &format!("{ca}-ca.crt"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-out",
            &format!("{leaf}.crt"),
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

fn p(dir: &Path, f: &str) -> String {
    dir.join(f).to_str().unwrap().to_string()
}

/// `redis-server` with TLS only (no plain port) presenting `cert`, requiring client
/// certificates signed by `trusted-ca.crt`.
async fn tls_server(dir: &Path, cert: &str) -> RedisProcess {
    let port = free_port();
    let mut args = redis_args(0, &[]);
    args.extend([
        "--tls-port".to_string(),
        port.to_string(),
        "--tls-cert-file".into(),
        p(dir, &format!("{cert}.crt")),
        "--tls-key-file".into(),
        p(dir, &format!("{cert}.key")),
        "--tls-ca-cert-file".into(),
        p(dir, "trusted-ca.crt"),
        "--tls-auth-clients".into(),
        "yes".into(),
    ]);
    RedisProcess::start(port, args).await
}

fn tls_flags(dir: &Path) -> Vec<String> {
    vec![
        "--redis-ca-file".into(),
        p(dir, "trusted-ca.crt"),
        "--redis-client-cert".into(),
        p(dir, "client.crt"),
        "--redis-client-key".into(),
        p(dir, "client.key"),
    ]
}

fn certs() -> PathBuf {
    let dir = scratch_dir("tls");
    ca(&dir, "trusted");
    ca(&dir, "rogue");
    leaf(&dir, "trusted", "server");
    leaf(&dir, "trusted", "client");
    leaf(&dir, "rogue", "impostor");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_deliver_across_a_tls_redis_and_refuse_an_untrusted_one() {
    let dir = certs();
    let server = tls_server(&dir, "server").await;
    let url = format!("rediss://127.0.0.1:{}/", server.port);
    let flags = tls_flags(&dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let n1 = TestNode::start(test_config_url("n1", &url, &flags)).await;
    let n2 = TestNode::start(test_config_url("n2", &url, &flags)).await;
    let mut a = n1.join("tls", "host", "a").await;
    let mut b = n2.join("tls", "viewer", "b").await;
    let took = delivery_resumes(&mut a, &mut b, Duration::from_secs(5)).await;
    assert!(took.is_some(), "cross-node delivery over TLS");
    a.publish(json!("over tls")).await;
    loop {
        if b.next_message().await["data"] == "over tls" {
            break;
        }
    }
    assert_eq!(n1.metric("gateway_redis_connected").await, 1.0);

    // A server whose certificate the trusted CA did not sign: refused, never ready.
    let impostor = tls_server(&dir, "impostor").await;
    let url = format!("rediss://127.0.0.1:{}/", impostor.port);
    let n3 = TestNode::start_unready(test_config_url("n3", &url, &flags)).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            readyz_status(&n3).await,
            503,
            "an untrusted server is refused"
        );
    }
    assert_eq!(n3.metric("gateway_redis_connected").await, 0.0);

    // The system roots do not trust a private CA either: without --redis-ca-file, refused.
    let url = format!("rediss://127.0.0.1:{}/", server.port);
    let n4 = TestNode::start_unready(test_config_url("n4", &url, &[])).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(readyz_status(&n4).await, 503);

    n1.stop().await;
    n2.stop().await;
    n3.stop().await;
    n4.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
