//! Command-line behaviour that needs no network: bad input is refused with a
//! located message and exit code 2, and nothing starts.
mod common;
use common::*;

#[test]
fn bad_wg_config_is_refused_with_file_and_line() {
    let dir = tempdir();
    let d = dir.path().display();
    let cases = [
        ("[Interface]\nPrivateKey = not-base64!\nAddress = 100.64.0.1/32\n", ":2: PrivateKey: not valid base64"),
        ("[Interface]\nPrivateKey = AAAA\n", ":2: PrivateKey: decodes to 3 bytes"),
        ("[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n", ":1: no [Interface] section"),
        (
            "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nAddress = 100.64.0.1/33\n",
            ":3: Address \"100.64.0.1/33\" is not an address or CIDR",
        ),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let f = format!("{d}/bad{i}.conf");
        std::fs::write(&f, body).unwrap();
        for cmd in [format!("up --wg-config {f} --state-dir {d}/s --no-ssh"), format!("nc --wg-config {f} 100.64.0.2 22")] {
            let (code, out, err) = run_timeout(&format!("{TAILGATE} {cmd} </dev/null"), 10);
            assert_eq!(code, 2, "{cmd}: {out} {err}");
            assert!(err.contains(&format!("{f}{want}")), "{cmd}: expected {want:?} in {err}");
            assert!(!out.contains("up at"), "nothing starts: {out}");
        }
    }
}

#[test]
fn bad_forward_and_policy_arguments_explain_themselves() {
    let dir = tempdir();
    let d = dir.path().display();
    let conf = format!("{d}/ok.conf");
    std::fs::write(&conf, "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nAddress = 100.64.0.1/32\n").unwrap();
    let (code, _, err) = run_timeout(&format!("{TAILGATE} up --wg-config {conf} --forward 8080 --state-dir {d}/s"), 10);
    assert_ne!(code, 0);
    assert!(err.contains("expected PORT=HOST:PORT"), "{err}");
    std::fs::write(format!("{d}/p.toml"), "[[ssh]]\nsrc = [\"group:nope\"]\ndst = [\"*\"]\nusers = [\"root\"]\naction = \"accept\"\n")
        .unwrap();
    let (code, _, err) = run_timeout(&format!("{TAILGATE} up --wg-config {conf} --policy {d}/p.toml --state-dir {d}/s"), 10);
    assert_ne!(code, 0);
    assert!(err.contains("p.toml:2:") && err.contains("group:nope"), "{err}");
    let (code, _, err) = run_timeout(&format!("{TAILGATE} policy check {d}/p.toml"), 10);
    assert_eq!(code, 1);
    assert!(err.contains("p.toml:2:"), "{err}");
}

#[test]
fn completions_and_key_tools() {
    let (code, out, _) = run_timeout(&format!("{TAILGATE} completions bash"), 10);
    assert_eq!(code, 0);
    assert!(out.contains("tailgate") && out.contains("complete"), "{out}");
    let (private, public) = keypair();
    assert_eq!(private.len(), 44);
    assert_eq!(public.len(), 44);
    assert_ne!(private, public);
}
