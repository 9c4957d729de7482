use berth_sandbox::native::{NativeBackend, NativeConfig};
use berth_sandbox::*;

#[tokio::test]
async fn smoke() {
    let dir = tempfile::tempdir().expect("tmp");
    let b = NativeBackend::new(NativeConfig {
        data_dir: dir.path().to_path_buf(),
        helper: env!("CARGO_BIN_EXE_berth-box-init").into(),
        pool_size: 1,
    })
    .expect("backend");
    let t = std::time::Instant::now();
    b.create(BoxConfig { id: "b1".into(), image: Image::Host, limits: Limits::default(), env: vec![], bridges: vec![] })
        .await
        .expect("create");
    eprintln!("create {:?}", t.elapsed());
    let out = b
        .exec("b1", ExecSpec { argv: vec!["sh".into(), "-c".into(), "id; hostname; ls /; cat /proc/self/status | grep -i cap; ip addr 2>&1 || cat /proc/net/dev; df -h /workspace; echo hi > /workspace/x; cat /etc/shadow; touch /etc/x; ps aux".into()], ..Default::default() })
        .await
        .expect("exec")
        .collect(None, 1 << 20)
        .await
        .expect("collect");
    eprintln!("{}\n{}\n{:?}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr), out.exit);
    eprintln!("{:?}", b.stats("b1").await);
    b.destroy("b1").await.expect("destroy");
}
