//! The hash chain at central (issue 17): the real agent syncs its readings, alert
//! events, audit log, chain links and signed heads to a real PostgreSQL behind a real
//! PgBouncer in transaction mode, and `outpost central verify` (the real binary, through
//! PgBouncer) finds an untouched copy clean, each kind of central tampering with its
//! kind, and rows not covered yet as pending; a gateway presenting a new key is refused
//! and reported until the documented SQL accepts it.

mod support;

use std::io::Write;
use std::path::Path;
use std::time::Duration;
use support::agent::{outpost, Agent};
use support::{free_port, PgBouncer, Postgres, SerialLink};

const DEADLINE: Duration = Duration::from_secs(90);

fn head(dir: &Path, gateway: &str, port: u16) -> String {
    format!(
        "[agent]\ngateway_id = \"{gateway}\"\nsite = \"Integrity test\"\n\n[storage]\npath = \"{}\"\n\
         batch_max_delay = \"10ms\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n",
        dir.join("outpost.db").display()
    )
}

fn sync_section(bouncer: &PgBouncer) -> String {
    format!(
        "[sync]\nurl = \"postgres://outpost@127.0.0.1:{}/outpost\"\npassword = \"outpost-pass\"\n\
         sslmode = \"disable\"\ninterval = \"1s\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\n\
         backoff_jitter = false\n\n",
        bouncer.port()
    )
}

/// A cold room that warms above 8 °C after 1 s (an alarm fires: alert events), read
/// every 50 ms.
fn sources() -> String {
    "[[sources]]\ntype = \"simulated\"\nname = \"sim\"\ndevices = [\"coldroom-1\", \"coldroom-2\"]\n\
     period = \"50ms\"\n[[sources.metrics]]\nname = \"temperature\"\nunit = \"°C\"\nbase = 3.5\n\
     [sources.excursion]\ndevice = \"coldroom-1\"\nmetric = \"temperature\"\nafter = \"1s\"\n\
     duration = \"1h\"\noffset = 8.0\n\n\
     [[alerts]]\nname = \"warm\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\n\
     severity = \"critical\"\nnotifiers = []\n\n"
        .to_string()
}

/// `outpost central migrate` through PgBouncer, as an operator would.
fn migrate(bouncer: &PgBouncer, partitioned: bool) -> String {
    let mut args = vec![
        "--config",
        "/nonexistent/outpost.toml",
        "central",
        "migrate",
        "--sslmode",
        "disable",
    ];
    if partitioned {
        args.push("--partitioned");
    }
    let url = bouncer.url();
    args.extend(["--url", &url]);
    let (code, out, err) = outpost(args);
    assert_eq!(code, Some(0), "central migrate: {out}{err}");
    out
}

/// `outpost central verify` through PgBouncer: (exit code, stdout + stderr).
fn verify(bouncer: &PgBouncer, extra: &[&str]) -> (Option<i32>, String) {
    let url = bouncer.url();
    let mut args = vec![
        "--config",
        "/nonexistent/outpost.toml",
        "central",
        "verify",
        "--sslmode",
        "disable",
        "--url",
        &url,
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = outpost(args);
    (code, format!("{out}{err}"))
}

/// The lines of `gateway`'s summary in verify's output.
fn block(output: &str, gateway: &str) -> String {
    let start = format!("Gateway {gateway}:");
    let mut lines = output
        .lines()
        .skip_while(|l| *l != start.as_str() && !l.starts_with(&start));
    let mut out = String::new();
    if let Some(first) = lines.next() {
        out.push_str(first);
        out.push('\n');
        for l in lines.take_while(|l| l.starts_with("  ")) {
            out.push_str(l);
            out.push('\n');
        }
    }
    assert!(!out.is_empty(), "no summary of {gateway} in:\n{output}");
    out
}

/// The `[code]` of a damaged gateway's summary.
fn damage_code(block: &str) -> Option<String> {
    let line = block.lines().find(|l| l.contains("DAMAGED"))?;
    let start = line.rfind('[')?;
    let end = line[start..].find(']')? + start;
    Some(line[start + 1..end].to_string())
}

fn count(pg: &Postgres, sql: &str) -> i64 {
    pg.psql(sql).trim().parse().unwrap_or(-1)
}

/// Copies everything central holds of `from` to a new gateway `to`.
fn clone_gateway(pg: &Postgres, from: &str, to: &str) {
    pg.psql(&format!(
        "BEGIN;
         INSERT INTO outpost.gateways (gateway_id, agent_version, site, public_key, public_key_pinned_at, backlog_rows)
           SELECT '{to}', agent_version, site, public_key, public_key_pinned_at, 0 FROM outpost.gateways WHERE gateway_id = '{from}';
         INSERT INTO outpost.readings (gateway_id, uid, observed_at, received_at, source, device, metric, value, unit, flags, meta, inserted_at, seq)
           SELECT '{to}', uid, observed_at, received_at, source, device, metric, value, unit, flags, meta, inserted_at, seq
           FROM outpost.readings WHERE gateway_id = '{from}';
         INSERT INTO outpost.alert_events (gateway_id, uid, rule, device, metric, kind, severity, value, threshold, occurred_at,
             message, inserted_at, actor, note, channel, seq, unit, since, message_text)
           SELECT '{to}', uid, rule, device, metric, kind, severity, value, threshold, occurred_at,
             message, inserted_at, actor, note, channel, seq, unit, since, message_text
           FROM outpost.alert_events WHERE gateway_id = '{from}';
         INSERT INTO outpost.audit_log (gateway_id, id, at, boot_id, since_boot, kind, actor, details, inserted_at)
           SELECT '{to}', id, at, boot_id, since_boot, kind, actor, details, inserted_at FROM outpost.audit_log WHERE gateway_id = '{from}';
         INSERT INTO outpost.chain_links (gateway_id, seq, tbl, first_id, last_id, rows, digest, head, sealed_at, inserted_at)
           SELECT '{to}', seq, tbl, first_id, last_id, rows, digest, head, sealed_at, inserted_at FROM outpost.chain_links WHERE gateway_id = '{from}';
         INSERT INTO outpost.chain_signatures (gateway_id, id, seq, head, signature, public_key, signed_at, inserted_at)
           SELECT '{to}', id, seq, head, signature, public_key, signed_at, inserted_at FROM outpost.chain_signatures WHERE gateway_id = '{from}';
         INSERT INTO outpost.chain_checkpoints (gateway_id, id, tbl, pruned_up_to, seq, head, reason, at, signature, public_key, inserted_at)
           SELECT '{to}', id, tbl, pruned_up_to, seq, head, reason, at, signature, public_key, inserted_at FROM outpost.chain_checkpoints WHERE gateway_id = '{from}';
         INSERT INTO outpost.chain_starts (gateway_id, tbl, start_id)
           SELECT '{to}', tbl, start_id FROM outpost.chain_starts WHERE gateway_id = '{from}';
         COMMIT;"
    ));
}

/// A covered reading's seq in the middle of `gateway`'s chain at central.
fn covered_reading(pg: &Postgres, gateway: &str, nth: i64) -> i64 {
    let seq = count(
        pg,
        &format!(
            "SELECT r.seq FROM outpost.readings r JOIN outpost.chain_links l \
               ON l.gateway_id = r.gateway_id AND l.tbl = 'readings' AND r.seq BETWEEN l.first_id AND l.last_id \
             WHERE r.gateway_id = '{gateway}' ORDER BY r.seq OFFSET {nth} LIMIT 1"
        ),
    );
    assert!(seq > 0, "no covered reading #{nth} of {gateway}");
    seq
}

/// Signs `head` at `seq` with a fresh key (not the gateway's): hex of (public key, signature).
fn forged_signature(seq: i64, head_hex: &str, claimed_key: Option<&str>) -> (String, String) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[0x5a; 32]);
    let head: [u8; 32] = hex::decode(head_hex.trim_start_matches("\\x"))
        .unwrap()
        .try_into()
        .unwrap();
    let sig = ed25519_dalek::Signer::sign(&key, &outpost::store::chain::head_message(seq, &head));
    let public = claimed_key
        .map(|k| k.trim_start_matches("\\x").to_string())
        .unwrap_or_else(|| hex::encode(key.verifying_key().to_bytes()));
    (public, hex::encode(sig.to_bytes()))
}

/// Runs an agent of `gateway` until central holds at least `readings` covered readings,
/// an alert event, audit entries and a signed head; returns it stopped.
fn run_until_chained(pg: &Postgres, bouncer: &PgBouncer, gateway: &str, dir: &Path) -> Agent {
    let config = format!(
        "{}{}{}",
        head(dir, gateway, free_port()),
        sync_section(bouncer),
        sources()
    );
    // A synchronised clock, whatever this machine's is: nothing is held back (G8).
    let clock = dir.join("clock");
    std::fs::write(&clock, "0 synchronized").unwrap();
    let mut agent = Agent::new(dir, &config)
        .env("OUTPOST_TEST_CLOCK_OFFSET_FILE", &clock)
        .deadline(DEADLINE)
        .start();
    agent.wait_until("the first readings at central", || {
        count(
            pg,
            &format!("SELECT count(*) FROM outpost.readings WHERE gateway_id = '{gateway}'"),
        ) > 0
    });
    // The clock steps 30 s forward: a clock.step audit entry (and the chain covers it).
    std::fs::write(&clock, "30 synchronized").unwrap();
    let q = |table: &str, cond: &str| {
        count(
            pg,
            &format!("SELECT count(*) FROM outpost.{table} WHERE gateway_id = '{gateway}' {cond}"),
        )
    };
    let counts = || {
        [
            q("chain_links", "AND tbl = 'readings'"),
            q("chain_signatures", ""),
            q("chain_links", "AND tbl = 'alert_events'"),
            q("chain_links", "AND tbl = 'audit_log'"),
            q("readings", "AND seq IS NOT NULL"),
        ]
    };
    let started = std::time::Instant::now();
    loop {
        let [links, sigs, events, audit, readings] = counts();
        if links >= 5 && sigs >= 1 && events >= 1 && audit >= 1 && readings >= 100 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "central has {links} readings links, {sigs} signatures, {events} event links, \
             {audit} audit links, {readings} readings with seq; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.terminate();
    agent
}

#[test]
fn untouched_central_copies_verify_and_every_kind_of_tampering_is_found() {
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    migrate(&bouncer, false);
    let dir = tempfile::tempdir().unwrap();
    let _agent = run_until_chained(&pg, &bouncer, "gw-a", dir.path());

    let (code, out) = verify(&bouncer, &[]);
    assert_eq!(code, Some(0), "untouched central verifies:\n{out}");
    let clean = block(&out, "gw-a");
    assert!(clean.contains("  OK"), "{clean}");
    assert!(clean.contains("signatures valid"), "{clean}");
    let verified = clean
        .lines()
        .find(|l| l.contains("links verified"))
        .unwrap_or("");
    for what in [" 0 readings", " 0 alert events", " 0 audit entries"] {
        assert!(
            !verified.contains(what),
            "all three tables verified: {clean}"
        );
    }

    // Each copy of the gateway gets one kind of tampering.
    let cases = [
        "value",
        "time",
        "deleted",
        "inserted",
        "inserted-seq",
        "swapped",
        "audit-deleted",
        "forged-key",
        "forged-signature",
        "key-swapped",
        "link-edited",
        "links-truncated",
        "event-changed",
    ];
    for case in cases {
        clone_gateway(&pg, "gw-a", &format!("gw-{case}"));
    }
    let (code, out) = verify(&bouncer, &[]);
    assert_eq!(code, Some(0), "untampered copies verify too:\n{out}");

    let g = |case: &str| format!("gw-{case}");
    let s = covered_reading(&pg, "gw-a", 20);
    pg.psql(&format!(
        "UPDATE outpost.readings SET value = value + 0.5 WHERE gateway_id = '{}' AND seq = {s}",
        g("value")
    ));
    pg.psql(&format!(
        "UPDATE outpost.readings SET observed_at = observed_at + interval '1 second' WHERE gateway_id = '{}' AND seq = {s}",
        g("time")
    ));
    pg.psql(&format!(
        "DELETE FROM outpost.readings WHERE gateway_id = '{}' AND seq = {s}",
        g("deleted")
    ));
    // A forged reading, as someone would add it: a new uid, no chain position.
    pg.psql(&format!(
        "INSERT INTO outpost.readings (gateway_id, uid, observed_at, received_at, source, device, metric, value, unit, flags) \
         SELECT gateway_id, gen_random_uuid(), observed_at + interval '10 ms', received_at, source, device, metric, 2.0, unit, flags \
         FROM outpost.readings WHERE gateway_id = '{}' AND seq = {s}",
        g("inserted")
    ));
    // ... and one that copies a chain position.
    pg.psql(&format!(
        "INSERT INTO outpost.readings (gateway_id, uid, observed_at, received_at, source, device, metric, value, unit, flags, seq) \
         SELECT gateway_id, gen_random_uuid(), observed_at + interval '10 ms', received_at, source, device, metric, 2.0, unit, flags, seq \
         FROM outpost.readings WHERE gateway_id = '{}' AND seq = {s}",
        g("inserted-seq")
    ));
    // Two readings swap places (their chain positions).
    let s2 = covered_reading(&pg, "gw-a", 21);
    pg.psql(&format!(
        "UPDATE outpost.readings SET seq = CASE seq WHEN {s} THEN {s2} ELSE {s} END \
         WHERE gateway_id = '{}' AND seq IN ({s}, {s2})",
        g("swapped")
    ));
    pg.psql(&format!(
        "DELETE FROM outpost.audit_log WHERE gateway_id = '{}' AND id = \
           (SELECT min(first_id) FROM outpost.chain_links WHERE gateway_id = 'gw-a' AND tbl = 'audit_log')",
        g("audit-deleted")
    ));
    pg.psql(&format!(
        "UPDATE outpost.alert_events SET message_text = replace(message_text, 'warm', 'cool') \
         WHERE gateway_id = '{}' AND seq IS NOT NULL",
        g("event-changed")
    ));
    // Signatures: a new one by another key; one claiming the pinned key.
    let last = pg.psql(
        "SELECT seq || '|' || head FROM outpost.chain_links WHERE gateway_id = 'gw-a' ORDER BY seq DESC LIMIT 1",
    );
    let (seq, head_hex) = last.split_once('|').unwrap();
    let seq: i64 = seq.parse().unwrap();
    let pinned = pg.psql("SELECT public_key FROM outpost.gateways WHERE gateway_id = 'gw-a'");
    for (case, claimed) in [
        ("forged-key", None),
        ("forged-signature", Some(pinned.as_str())),
    ] {
        let (public, sig) = forged_signature(seq, head_hex, claimed);
        pg.psql(&format!(
            "INSERT INTO outpost.chain_signatures (gateway_id, id, seq, head, signature, public_key, signed_at) \
             VALUES ('{}', 1000000, {seq}, '{head_hex}', '\\x{sig}', '\\x{public}', now())",
            g(case)
        ));
    }
    pg.psql(&format!(
        "UPDATE outpost.gateways SET public_key = '\\x{}' WHERE gateway_id = '{}'",
        "11".repeat(32),
        g("key-swapped")
    ));
    pg.psql(&format!(
        "UPDATE outpost.chain_links SET rows = rows - 1 WHERE gateway_id = '{}' AND seq = \
           (SELECT min(seq) FROM outpost.chain_links WHERE gateway_id = 'gw-a' AND tbl = 'readings' AND rows > 1)",
        g("link-edited")
    ));
    // The newest links and their rows removed: the last signature names a link central lacks.
    let sig_seq = count(
        &pg,
        "SELECT max(seq) FROM outpost.chain_signatures WHERE gateway_id = 'gw-a'",
    );
    pg.psql(&format!(
        "DELETE FROM outpost.chain_links WHERE gateway_id = '{}' AND seq >= {sig_seq}",
        g("links-truncated")
    ));

    let (code, out) = verify(&bouncer, &[]);
    assert_eq!(code, Some(1), "tampering fails the verification:\n{out}");
    assert!(block(&out, "gw-a").contains("  OK"), "{out}");
    let expected = [
        ("value", &["digest"][..]),
        ("time", &["digest"]),
        ("deleted", &["rows-missing"]),
        ("inserted", &["not-covered"]),
        ("inserted-seq", &["not-covered", "rows-extra"]),
        ("swapped", &["digest"]),
        ("audit-deleted", &["rows-missing"]),
        ("forged-key", &["key-changed"]),
        ("forged-signature", &["signature-invalid"]),
        ("key-swapped", &["key-changed"]),
        ("link-edited", &["head"]),
        ("links-truncated", &["signed-head"]),
        ("event-changed", &["digest"]),
    ];
    for (case, codes) in expected {
        let b = block(&out, &g(case));
        let found = damage_code(&b);
        assert!(
            found.as_deref().is_some_and(|c| codes.contains(&c)),
            "{case}: expected one of {codes:?}, found {found:?}:\n{b}"
        );
    }
    // Where: the link and id range of the changed reading, with its time.
    let b = block(&out, &g("value"));
    assert!(b.contains("readings link"), "{b}");
    assert!(b.contains("rows from "), "{b}");

    // One gateway at a time.
    let (code, out) = verify(&bouncer, &["--gateway", "gw-a"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 gateway(s), 1 verified clean"), "{out}");
    let (code, out) = verify(&bouncer, &["--gateway", "gw-value"]);
    assert_eq!(code, Some(1), "{out}");
    // --since after everything: links are chained, no rows re-hashed: the change is not seen.
    let (code, out) = verify(
        &bouncer,
        &["--gateway", "gw-value", "--since", "2999-01-01"],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("links before --since"), "{out}");
}

#[test]
fn a_new_gateway_key_is_refused_and_reported_until_an_operator_accepts_it() {
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    migrate(&bouncer, true);
    // The migration is idempotent.
    assert!(migrate(&bouncer, true).contains("up to date"));
    let dir = tempfile::tempdir().unwrap();
    let mut agent = run_until_chained(&pg, &bouncer, "gw-k", dir.path());
    let old_key =
        pg.psql("SELECT encode(public_key, 'hex') FROM outpost.gateways WHERE gateway_id = 'gw-k'");
    assert_eq!(old_key.len(), 64, "{old_key}");

    // A new key (e.g. the SD card's key file was lost and regenerated).
    std::fs::write(dir.path().join("gateway.key"), [0x33u8; 32]).unwrap();
    agent.start_again();
    agent.wait_until("central parks the new key", || {
        count(
            &pg,
            "SELECT count(*) FROM outpost.gateways WHERE gateway_id = 'gw-k' AND public_key_pending IS NOT NULL \
             AND public_key_refused_at IS NOT NULL",
        ) == 1
    });
    let links_refused = count(
        &pg,
        "SELECT count(*) FROM outpost.chain_links WHERE gateway_id = 'gw-k'",
    );
    let readings_then = count(
        &pg,
        "SELECT count(*) FROM outpost.readings WHERE gateway_id = 'gw-k'",
    );
    agent.wait_until("readings still reach central", || {
        count(
            &pg,
            "SELECT count(*) FROM outpost.readings WHERE gateway_id = 'gw-k'",
        ) > readings_then + 50
    });
    // Reported on the gateway: /health, outpost status, one ERROR line.
    let check = agent.wait_check("sync", |c| c["ok"] == false);
    let detail = check["detail"].as_str().unwrap_or("");
    assert!(detail.contains("accept_gateway_key('gw-k')"), "{check}");
    let status = agent.status_text();
    assert!(
        status.contains("FAILING") && status.contains("another public key"),
        "{status}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = agent.log();
    assert_eq!(
        log.matches("Central refused this gateway's public key")
            .count(),
        1,
        "one ERROR line:\n{log}"
    );
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM outpost.chain_links WHERE gateway_id = 'gw-k'"
        ),
        links_refused,
        "no chain uploads while refused"
    );
    // Central: the old chain verifies; the readings sent since are pending, not damage.
    let (code, out) = verify(&bouncer, &["--gateway", "gw-k"]);
    assert_eq!(code, Some(0), "{out}");
    let b = block(&out, "gw-k");
    assert!(
        b.contains("NEW KEY") && b.contains("accept_gateway_key('gw-k')"),
        "{b}"
    );
    assert!(b.contains("pending (not yet covered"), "{b}");
    assert!(
        !b.contains("pending (not yet covered by a link at central): 0 readings"),
        "{b}"
    );

    // The operator accepts it, with the SQL of docs/central.md.
    pg.psql("SELECT outpost.accept_gateway_key('gw-k')");
    agent.wait_until("the chain uploads again", || {
        count(&pg, "SELECT count(*) FROM outpost.chain_links WHERE gateway_id = 'gw-k'") > links_refused
            && count(
                &pg,
                "SELECT count(*) FROM outpost.chain_signatures WHERE gateway_id = 'gw-k' \
                 AND public_key = (SELECT public_key FROM outpost.gateways WHERE gateway_id = 'gw-k')",
            ) >= 1
    });
    agent.wait_check("sync", |c| c["ok"] == true);
    assert!(agent
        .log()
        .contains("Central accepted this gateway's public key"));
    assert!(!agent.status_text().contains("another public key"));
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM outpost.gateway_keys WHERE gateway_id = 'gw-k'"
        ),
        1,
        "the old key is kept"
    );
    agent.terminate();
    // Both keys' signatures verify; nothing is pending that should not be.
    let (code, out) = verify(&bouncer, &["--gateway", "gw-k"]);
    assert_eq!(code, Some(0), "{out}");
    let b = block(&out, "gw-k");
    assert!(b.contains("  OK") && !b.contains("NEW KEY"), "{b}");
}

/// G8 at central: readings stamped while the clock was not synchronised are held back,
/// corrected after the clock steps, then sent; central verification replays the
/// corrections from the audit log and finds the chain intact.
#[test]
fn corrected_readings_verify_centrally() {
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    migrate(&bouncer, false);
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "0 unsynchronized").unwrap();
    let link = SerialLink::start();
    let config = format!(
        "{}{}[[sources]]\ntype = \"serial\"\nname = \"ser\"\npath = \"{}\"\nformat = \"key-value\"\n\
         reopen_max_delay = \"500ms\"\n[sources.fields]\ndevice = \"p1\"\n",
        head(dir.path(), "gw-c", free_port()),
        sync_section(&bouncer),
        link.device_path().display()
    );
    let mut agent = Agent::new(dir.path(), &config)
        .env("OUTPOST_TEST_CLOCK_OFFSET_FILE", &clock)
        .deadline(DEADLINE)
        .start();
    let write_lines = |from: usize, to: usize| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(link.peer_path())
            .unwrap();
        for i in from..to {
            f.write_all(format!("n={i}\n").as_bytes()).unwrap();
        }
        f.flush().unwrap();
    };
    // The port opens shortly after the start: write until the first readings arrive.
    let mut written = 0;
    agent.wait_until("readings flagged CLOCK_UNSYNCED", || {
        write_lines(written, written + 1);
        written += 1;
        std::thread::sleep(Duration::from_millis(100));
        agent.try_count("SELECT COUNT(*) FROM readings WHERE flags & 1 = 1") >= Some(1)
    });
    write_lines(written, written + 30);
    agent.wait_until("30 more", || {
        agent.try_count("SELECT COUNT(*) FROM readings WHERE flags & 1 = 1") >= Some(21)
    });
    std::fs::write(&clock, "86400 synchronized").unwrap();
    agent.wait_until("the readings to be corrected", || {
        agent.try_count("SELECT COUNT(*) FROM readings WHERE flags & 9 = 9") >= Some(20)
    });
    write_lines(1000, 1005);
    agent.wait_until("the corrected readings and their links at central", || {
        let corrected = count(
            &pg,
            "SELECT count(*) FROM outpost.readings WHERE gateway_id = 'gw-c' AND flags & 9 = 9",
        );
        let newest_corrected = agent
            .try_count("SELECT COALESCE(MAX(id), 0) FROM readings WHERE flags & 9 = 9")
            .unwrap_or(i64::MAX);
        let covered = count(
            &pg,
            "SELECT COALESCE(max(last_id), 0) FROM outpost.chain_links \
             WHERE gateway_id = 'gw-c' AND tbl = 'readings'",
        );
        corrected >= 20 && covered > newest_corrected
    });
    agent.terminate();
    assert!(
        count(
            &pg,
            "SELECT count(*) FROM outpost.audit_log WHERE gateway_id = 'gw-c' AND kind = 'clock.correction'"
        ) >= 1,
        "the corrections reached central"
    );
    let (code, out) = verify(&bouncer, &["--gateway", "gw-c"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(block(&out, "gw-c").contains("  OK"), "{out}");
    // The corrected time changed centrally is still found.
    pg.psql(
        "UPDATE outpost.readings SET observed_at = observed_at + interval '1 hour' \
         WHERE gateway_id = 'gw-c' AND seq = (SELECT min(seq) FROM outpost.readings \
           WHERE gateway_id = 'gw-c' AND flags & 9 = 9)",
    );
    let (code, out) = verify(&bouncer, &["--gateway", "gw-c"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(
        damage_code(&block(&out, "gw-c")).as_deref(),
        Some("digest"),
        "{out}"
    );
}
