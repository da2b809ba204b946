//! LUKS volumes on image files. The host has no device-mapper, so the fixtures are encrypted by
//! an implementation other than bmr's: qemu-img's LUKS driver (LUKS1, aes-xts-plain64) writes
//! the ciphertext, cryptsetup the LUKS2 headers; what bmr restored is decrypted back by
//! qemu-img and checked with e2fsck. LUKS2 through dm-crypt itself is drilled in QEMU
//! (qemu-tests/rescue.sh luks).

mod common;
use common::*;

const FS_UUID: &str = "7c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e";
const PASS: &str = "correct horse battery staple";

/// A GPT disk of 72 MiB, random bytes first: partition 1 an 8 MiB ext4, partition 2 to the end
/// a LUKS1 volume (qemu-img, aes-256-xts-plain64) holding a 40 MiB ext4 of `tree`. Returns
/// the disk, partition 2's start and length, and the volume's UUID.
fn luks_disk(tmp: &Tmp, tree: &std::path::Path) -> (std::path::PathBuf, u64, u64, String) {
    let disk = tmp.path("disk.img");
    sh(&format!(
        "head -c {} /dev/urandom > {d} && sgdisk -o -n 1:0:+8M -t 1:8300 -n 2:0:0 -t 2:8309 {d} >/dev/null",
        72 * MIB,
        d = disk.display()
    ));
    let (_, parts) = sfdisk_parts(&disk);
    let (_, p1, p1_len) = parts[0];
    let (_, start, len) = parts[1];
    let empty = tmp.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let boot = tmp.path("boot.img");
    make_ext(&boot, p1_len / MIB, "ext4", "", &empty);
    place(&disk, &boot, p1);
    let fs = tmp.path("fs.img");
    make_ext(&fs, 40, "ext4", &format!("-L root -U {FS_UUID}"), tree);
    std::fs::write(tmp.path("pass"), PASS).unwrap();
    let luks = tmp.path("luks.img");
    sh(&format!(
        "qemu-img convert -q -f raw -O luks --object secret,id=s0,file={pass} \
         -o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=10 {fs} {luks}",
        pass = tmp.s("pass"),
        fs = fs.display(),
        luks = luks.display()
    ));
    assert!(std::fs::metadata(&luks).unwrap().len() < len);
    place(&disk, &luks, start);
    let uuid = sh(&format!("cryptsetup luksUUID {}", luks.display()))
        .trim()
        .to_string();
    (disk, start, len, uuid)
}

/// The plaintext of the LUKS volume in `[start, start+len)` of `disk`, decrypted by qemu-img.
fn decrypt(
    tmp: &Tmp,
    disk: &std::path::Path,
    start: u64,
    len: u64,
    out: &str,
) -> std::path::PathBuf {
    let part = tmp.path(&format!("{out}-part.img"));
    extract(disk, start, len, &part);
    let plain = tmp.path(&format!("{out}.img"));
    sh(&format!(
        "qemu-img convert -q --object secret,id=s0,file={pass} \
         --image-opts driver=luks,key-secret=s0,file.filename={part} -O raw {plain}",
        pass = tmp.s("pass"),
        part = part.display(),
        plain = plain.display()
    ));
    plain
}

fn manifest(repo: &str, host: &str) -> serde_json::Value {
    serde_json::from_str(&sh(&format!("cat {repo}/hosts/{host}/snapshots/*.json"))).unwrap()
}

fn luks_area(m: &serde_json::Value) -> serde_json::Value {
    m["areas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["luks"].is_object())
        .expect("no LUKS area in the manifest")
        .clone()
}

#[test]
fn luks1_used_ciphertext_round_trip() {
    let tmp = Tmp::new("luks1");
    let tree = tmp.path("tree");
    populate(&tree, 21);
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(
        tree.join("etc/fstab"),
        format!("/dev/mapper/root / ext4 defaults 0 1\n# UUID={FS_UUID}\n"),
    )
    .unwrap();
    let (disk, start, len, uuid) = luks_disk(&tmp, &tree);
    let d = disk.display().to_string();
    let vol = format!("luks/{uuid}");

    // No key: the volume is stored whole, and the backup says why.
    let repo = tmp.s("repo");
    let out = bmr(&["backup", "--repo", &repo, "--host", "nokey", &d]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no key to open it (give --luks-keyfile)"),
        "{err}"
    );
    let a = luks_area(&manifest(&repo, "nokey"));
    assert_eq!(a["content"], "whole");
    assert_eq!(a["used_bytes"], len);
    assert_eq!(a["luks"]["version"], 1);
    assert_eq!(a["luks"]["cipher"], "aes-xts-plain64");

    // A wrong key: one line, and no snapshot.
    std::fs::write(tmp.path("wrong"), "not the passphrase").unwrap();
    let e = bmr_fails(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "wrong",
        "--luks-keyfile",
        &tmp.s("wrong"),
        &d,
    ]);
    assert!(e.contains("the key does not open it"), "{e}");
    assert!(!tmp.path("repo/hosts/wrong").exists());

    // The key: only the used blocks' ciphertext, and no plaintext file list.
    let key = tmp.s("pass");
    let out = bmr(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "web1",
        "--luks-keyfile",
        &key,
        &d,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("add --allow-plaintext-luks"), "{err}");
    let m = manifest(&repo, "web1");
    let a = luks_area(&m);
    assert_eq!(a["content"], "used-blocks");
    assert_eq!(a["volumes"][0]["name"], vol.as_str());
    assert_eq!(a["volumes"][0]["fs"]["fstype"], "ext4");
    assert_eq!(a["volumes"][0]["fs"]["uuid"], FS_UUID);
    let used = a["used_bytes"].as_u64().unwrap();
    assert!(
        used < len / 2,
        "the LUKS volume stored {used} of {len} bytes"
    );
    assert!(
        m["tocs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["volume"].is_null()),
        "a file list of the encrypted filesystem was stored without --allow-plaintext-luks"
    );
    let e = bmr_fails(&["ls", "--repo", &repo, "--host", "web1", "--part", &vol, "/"]);
    assert!(e.contains(&vol) || e.contains("file list"), "{e}");

    // Written back as it was: the old passphrase opens it, the filesystem inside is whole.
    let target = tmp.path("target.img");
    bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "web1",
        "--target",
        &target.display().to_string(),
        "--yes",
    ]);
    let head = a["luks"]["data_offset"].as_u64().unwrap();
    assert_eq!(
        read_range(&target, start, head),
        read_range(&disk, start, head),
        "the LUKS header and keyslots changed"
    );
    let plain = decrypt(&tmp, &target, start, len, "restored");
    let (ok, out) = sh_status(&format!("e2fsck -fn {}", plain.display()));
    assert!(ok, "e2fsck inside the restored LUKS volume:\n{out}");
    let src_plain = decrypt(&tmp, &disk, start, len, "source");
    for (off, l) in ext_used_ranges(&src_plain) {
        assert!(
            read_range(&src_plain, off, l) == read_range(&plain, off, l),
            "used bytes at {off}+{l} inside the volume differ"
        );
    }
    let mnt = Mount::ext(
        &plain,
        0,
        std::fs::metadata(&plain).unwrap().len(),
        &tmp.path("mnt"),
    );
    sh(&format!(
        "diff -r --no-dereference -x lost+found {} {}",
        tree.display(),
        mnt.0.display()
    ));
    drop(mnt);

    // Allowed plaintext: the file list, and files through the key.
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "web2",
        "--luks-keyfile",
        &key,
        "--allow-plaintext-luks",
        &d,
    ]);
    let m = manifest(&repo, "web2");
    assert_eq!(luks_area(&m)["luks"]["plaintext"], true);
    let t = m["tocs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["volume"] == vol.as_str())
        .expect("no file list of the LUKS volume");
    assert_eq!(t["system"], true);
    let ls = bmr_ok(&["ls", "--repo", &repo, "--host", "web2", "/etc"]);
    assert!(ls.contains("fstab"), "{ls}");
    let rf = tmp.s("rf");
    let e = bmr_fails(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "web2",
        "--part",
        &vol,
        "--to",
        &rf,
        "etc/fstab",
    ]);
    assert!(e.contains("--luks-keyfile"), "{e}");
    bmr_ok(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "web2",
        "--part",
        &vol,
        "--luks-keyfile",
        &key,
        "--to",
        &rf,
        "etc",
    ]);
    sh(&format!("diff -r {} {rf}/etc", tree.join("etc").display()));
    bmr_ok(&["verify", "--repo", &repo]);
}

#[test]
fn luks2_headers() {
    let tmp = Tmp::new("luks2");
    let disk = tmp.path("disk.img");
    sh(&format!(
        "head -c {} /dev/urandom > {d} && sgdisk -o -n 1:0:+36M -t 1:8309 {d} >/dev/null",
        40 * MIB,
        d = disk.display()
    ));
    let (_, parts) = sfdisk_parts(&disk);
    let (_, start, len) = parts[0];
    std::fs::write(tmp.path("pass"), PASS).unwrap();
    let l = Loop::new(&disk, start, len, false);
    sh(&format!(
        "cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
         --sector-size 4096 --label web-root --key-file {} {}",
        tmp.s("pass"),
        l.0
    ));
    drop(l);
    let repo = tmp.s("repo");
    let d = disk.display().to_string();
    // Nothing inside maps (random bytes): the data is stored, the header is read right.
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "h",
        "--luks-keyfile",
        &tmp.s("pass"),
        &d,
    ]);
    let a = luks_area(&manifest(&repo, "h"));
    assert_eq!(a["luks"]["version"], 2);
    assert_eq!(a["luks"]["label"], "web-root");
    assert_eq!(a["luks"]["sector_size"], 4096);
    assert_eq!(a["luks"]["data_offset"], 16 * MIB);
    assert_eq!(a["luks"]["dynamic"], true);
    assert_eq!(a["used_bytes"], len);

    // A damaged header (one byte of its JSON): refused, the partition stored whole.
    sh(&format!(
        "printf 'X' | dd of={d} bs=1 seek={} conv=notrunc status=none",
        start + 4096 + 10
    ));
    let out = bmr(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "h2",
        "--luks-keyfile",
        &tmp.s("pass"),
        &d,
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("LUKS2 header checksum does not match"),
        "{err}"
    );
}
