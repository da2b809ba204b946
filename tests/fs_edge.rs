//! Filesystems bmr must back up without losing data or the file list, made with the real tools
//! (mke2fs -O ea_inode/encrypt, setfattr, e4crypt, debugfs, mkfs.fat -I, mtools) and checked
//! through the real `bmr backup`, `ls`, `restore-files` and `restore`.

mod common;
use common::*;
use std::path::Path;

fn backup(repo: &str, host: &str, disk: &Path) -> String {
    let out = bmr(&[
        "backup",
        "--repo",
        repo,
        "--host",
        host,
        "-q",
        &disk.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "backup failed: {stderr}");
    stderr
}

fn getfattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    xattr::get(p, name).unwrap()
}

const P1: u64 = MIB;
const P1_LEN: u64 = 96 * MIB;

/// A 9000-byte xattr value lives in an EA inode (mke2fs -O ea_inode, setfattr on the mount):
/// restore-files from the image and from an incremental on it, and a restore of the
/// incremental, all bring it back.
#[test]
fn ea_inode_xattrs_survive_restore_files_and_incrementals() {
    let tmp = Tmp::new("eainode");
    let tree = tmp.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("f"), "data\n").unwrap();
    std::fs::write(tree.join("keep"), "kept\n").unwrap();
    let disk = ext_disk(&tmp, 100, 96, "-O ea_inode", &tree);
    let live = tmp.path("live");
    std::fs::create_dir_all(&live).unwrap();
    let mount_rw = || {
        sh(&format!(
            "mount -o loop,offset={P1},sizelimit={P1_LEN} {} {}",
            disk.display(),
            live.display()
        ))
    };
    let big = vec![b'v'; 9000];
    mount_rw();
    for f in ["f", "keep"] {
        xattr::set(live.join(f), "user.big", &big).unwrap();
    }
    sh(&format!("umount {}", live.display()));
    let repo = tmp.s("repo");
    let stderr = backup(&repo, "h", &disk);
    assert!(!stderr.contains("warning"), "{stderr}");

    // The files come back onto an ext4 that can hold such values too.
    let scratch = tmp.path("scratch.img");
    sh(&format!(
        "mke2fs -q -F -t ext4 -O ea_inode {} 32M",
        scratch.display()
    ));
    let targets = tmp.path("targets");
    std::fs::create_dir_all(&targets).unwrap();
    sh(&format!(
        "mount -o loop {} {}",
        scratch.display(),
        targets.display()
    ));
    let _unmount = Mount(targets.clone());
    let restore_files = |to: &str| {
        let to = targets.join(to);
        bmr_ok(&[
            "restore-files",
            "--repo",
            &repo,
            "--host",
            "h",
            "--to",
            &to.display().to_string(),
            "/f",
            "/keep",
        ]);
        to
    };
    let out = restore_files("from-image");
    for f in ["f", "keep"] {
        assert_eq!(getfattr(&out.join(f), "user.big"), Some(big.clone()), "{f}");
    }

    // An incremental: f changes, keep does not (its entry comes from the image's list).
    mount_rw();
    std::fs::write(live.join("f"), "changed\n").unwrap();
    let inc = bmr(&[
        "backup",
        "--incremental",
        "--repo",
        &repo,
        "--host",
        "h",
        &live.display().to_string(),
    ]);
    sh(&format!("umount {}", live.display()));
    assert!(
        inc.status.success(),
        "{}",
        String::from_utf8_lossy(&inc.stderr)
    );
    let out = restore_files("from-incremental");
    for f in ["f", "keep"] {
        assert_eq!(getfattr(&out.join(f), "user.big"), Some(big.clone()), "{f}");
    }
    assert_eq!(std::fs::read(out.join("f")).unwrap(), b"changed\n");

    let dst = tmp.path("dst.img");
    bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "h",
        "--target",
        &dst.display().to_string(),
        "-q",
    ]);
    let m = Mount::ext(&dst, P1, P1_LEN, &tmp.path("restored"));
    for f in ["f", "keep"] {
        assert_eq!(getfattr(&m.0.join(f), "user.big"), Some(big.clone()), "{f}");
    }
}

/// One fscrypt directory (e4crypt on a real mount: ciphertext names) and a damaged directory
/// (names with '/' and NUL, a duplicate name: its block edited) leave the file list readable:
/// `ls` and `restore-files` work, the backup says what it left out.
#[test]
fn encrypted_dir_and_impossible_names_keep_the_file_list() {
    let tmp = Tmp::new("fscrypt");
    let disk = tmp.path("disk.img");
    let mnt = tmp.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        r#"head -c 64M /dev/urandom > {d}
        mke2fs -q -F -t ext4 -O encrypt -b 4096 -E nodiscard {d}
        mount -o loop {d} {m}
        mkdir {m}/secret {m}/names {m}/plain
        echo -n 'bmr test passphrase' | e4crypt add_key -S 0x5eed5eed5eed5eed5eed5eed5eed5eed {m}/secret >/dev/null
        for i in $(seq 64); do echo $i > {m}/secret/file-with-a-long-name-$i; done
        touch {m}/names/aXb {m}/names/nYl {m}/names/dupA {m}/names/dupB {m}/names/ok
        echo plain > {m}/plain/a
        umount {m}
        blk=$(debugfs -R 'blocks /names' {d} 2>/dev/null)
        python3 - {d} $blk <<'PY'
import sys
path, blk = sys.argv[1], int(sys.argv[2])
with open(path, 'r+b') as f:
    f.seek(blk * 4096)
    b = bytearray(f.read(4096))
    for a, z in ((b'aXb', b'a/b'), (b'nYl', b'n\0l'), (b'dupB', b'dupA')):
        i = b.index(a)
        b[i:i + len(z)] = z
    f.seek(blk * 4096)
    f.write(b)
PY"#,
        d = disk.display(),
        m = mnt.display()
    ));
    let repo = tmp.s("repo");
    let stderr = backup(&repo, "h", &disk);
    assert!(
        stderr.contains(
            "encrypted directory /secret: its files are in the image but not in the file list"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("/names/dupA: a second entry"), "{stderr}");
    assert!(!stderr.contains("no file list"), "{stderr}");

    let ls = bmr_ok(&["ls", "--repo", &repo, "--host", "h", "/"]);
    for n in ["\"secret\"", "\"names\"", "\"plain\""] {
        assert!(ls.contains(n), "{n} missing:\n{ls}");
    }
    let ls = bmr_ok(&["ls", "--repo", &repo, "--host", "h", "/names"]);
    assert!(ls.contains("\"ok\"") && ls.contains("\"dupA\""), "{ls}");
    assert_eq!(ls.matches("\"dupA\"").count(), 1, "{ls}");
    assert!(!ls.contains("\"a\"") && !ls.contains("dupB"), "{ls}");
    let to = tmp.path("out");
    bmr_ok(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "h",
        "--to",
        &to.display().to_string(),
        "/plain",
    ]);
    assert_eq!(std::fs::read(to.join("plain/a")).unwrap(), b"plain\n");
}

/// A filesystem marked clean whose group descriptors contradict their bitmaps (crafted with
/// debugfs and python on a real mke2fs image; e2fsck -fn confirms each): the blocks in doubt
/// are stored, so the file whose data lies there is restored intact, and a warning names the
/// group.
#[test]
fn group_descriptor_contradictions_lose_no_data() {
    let tmp = Tmp::new("bgdoubt");
    let tree = tmp.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    sh(&format!(
        "head -c $((60 * 1024 * 1024)) /dev/urandom > {}/big",
        tree.display()
    ));
    let repo = tmp.s("repo");
    let crafts = [
        // BLOCK_UNINIT on a group holding file data.
        (
            "uninit",
            "printf 'set_bg 2 flags 3\\nset_bg 2 checksum calc\\n' | debugfs -w -n -f - IMG >/dev/null",
        ),
        // The bitmap frees 1152 of the file's blocks; the free count is left as it was.
        (
            "bitmap",
            "bb=$(dumpe2fs IMG 2>/dev/null | sed -n '/^Group 2:/,/^Group 3:/p' | sed -n 's/.*Block bitmap at \\([0-9]*\\).*/\\1/p') && \
             python3 -c \"import sys; f=open('IMG','r+b'); f.seek($bb*4096+512); f.write(bytes(144))\"",
        ),
    ];
    for (name, craft) in crafts {
        let disk = tmp.path(&format!("{name}.img"));
        make_ext(&disk, 128, "ext4", "-b 4096 -g 8192", &tree);
        let blocks = sh(&format!(
            "debugfs -R 'blocks /big' {} 2>/dev/null",
            disk.display()
        ));
        assert!(
            blocks
                .split_whitespace()
                .any(|b| (20480..21632).contains(&b.parse::<u64>().unwrap())),
            "the file has no data in group 2: {blocks}"
        );
        sh(&craft.replace("IMG", &disk.display().to_string()));
        let (clean, fsck) = sh_status(&format!("e2fsck -fn {}", disk.display()));
        assert!(!clean, "{name}: the craft did not take: {fsck}");

        let stderr = backup(&repo, name, &disk);
        assert!(
            stderr.contains("block group 2:") && stderr.contains("all its blocks are stored"),
            "{name}: {stderr}"
        );
        let dst = tmp.path(&format!("{name}-dst.img"));
        bmr_ok(&[
            "restore",
            "--repo",
            &repo,
            "--host",
            name,
            "--target",
            &dst.display().to_string(),
            "-q",
        ]);
        let got = tmp.path(&format!("{name}-big"));
        sh(&format!(
            "debugfs -n -R 'dump /big {}' {} 2>/dev/null",
            got.display(),
            dst.display()
        ));
        sh(&format!("cmp {}/big {}", tree.display(), got.display()));
    }
}

/// A FAT filesystem on the whole disk (mkfs.fat -I, a "superfloppy") is backed up as a
/// filesystem: used clusters only, with a file list; restored onto a bigger disk without a
/// partition table, fsck.fat-clean, with the same files.
#[test]
fn fat_superfloppy_backs_up_with_a_file_list() {
    let tmp = Tmp::new("superfloppy");
    let tree = tmp.path("tree");
    populate_fat(&tree);
    for bits in [16, 32] {
        let disk = tmp.path(&format!("fat{bits}.img"));
        make_fat(&disk, 128, bits, &tree, "-I");
        let repo = tmp.s(&format!("repo{bits}"));
        let stderr = backup(&repo, "h", &disk);
        assert!(!stderr.contains("warning"), "{stderr}");
        // Free clusters hold random bytes: stored whole, the repository would be 128 MiB.
        let stored: u64 = sh(&format!("du -sb {repo} | cut -f1"))
            .trim()
            .parse()
            .unwrap();
        assert!(stored < 8 * MIB, "FAT{bits}: {stored} bytes stored");

        let ls = bmr_ok(&["ls", "--repo", &repo, "--host", "h", "/"]);
        assert!(ls.contains("\"EFI\"") && ls.contains("\"docs\""), "{ls}");
        let ls = bmr_ok(&["ls", "--repo", &repo, "--host", "h", "/docs"]);
        assert!(ls.contains("\"file25.txt\""), "{ls}");

        let dst = tmp.path(&format!("fat{bits}-dst.img"));
        sh(&format!("truncate -s 192M {}", dst.display()));
        bmr_ok(&[
            "restore",
            "--repo",
            &repo,
            "--host",
            "h",
            "--target",
            &dst.display().to_string(),
            "--yes",
            "-q",
        ]);
        sh(&format!("fsck.fat -n {}", dst.display()));
        let mdir = |img: &Path| sh(&format!("mdir -/ -i {} ::/", img.display()));
        assert_eq!(mdir(&dst), mdir(&disk), "FAT{bits}");
        let out = tmp.path(&format!("fat{bits}-out"));
        std::fs::create_dir_all(&out).unwrap();
        sh(&format!(
            "mcopy -s -n -i {} ::/EFI ::/docs {}/ && diff -r {} {}",
            dst.display(),
            out.display(),
            tree.display(),
            out.display()
        ));
    }
}
