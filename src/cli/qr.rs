//! Contact cards as pictures: a LATSSIAM URL drawn as a QR code in a PNG
//! (qrcode, png), and read back from one (png, rqrr).

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Pixels per QR module, and the quiet zone in modules (the standard's 4).
const SCALE: usize = 8;
const QUIET: usize = 4;
/// Largest picture read: 8192 x 8192 pixels (a phone's photo fits).
const MAX_SIDE: u32 = 8192;

/// Writes `text` as a QR code into a greyscale PNG at `path`.
///
/// # Errors
/// If it cannot be encoded or written.
pub fn write_png(text: &str, path: &Path) -> Result<()> {
    let code = qrcode::QrCode::new(text.as_bytes()).context("cannot encode the QR code")?;
    let modules = code.width();
    let colors = code.to_colors();
    let side = (modules + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, c) in colors.iter().enumerate() {
        if *c == qrcode::Color::Dark {
            let (mx, my) = (i % modules + QUIET, i / modules + QUIET);
            for y in my * SCALE..(my + 1) * SCALE {
                pixels[y * side + mx * SCALE..y * side + (mx + 1) * SCALE].fill(0);
            }
        }
    }
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let side32 = u32::try_from(side).context("QR code too large")?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), side32, side32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().with_context(|| format!("cannot write {}", path.display()))?;
    writer.write_image_data(&pixels).with_context(|| format!("cannot write {}", path.display()))?;
    writer.finish().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The text of the first QR code found in the PNG at `path`.
///
/// # Errors
/// If the file is no PNG this can read, or holds no readable QR code.
pub fn read_png(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().with_context(|| format!("{} is not a PNG", path.display()))?;
    let info = reader.info();
    if info.width > MAX_SIDE || info.height > MAX_SIDE {
        bail!(
            "{}: a picture of {}x{} pixels is too large (at most {MAX_SIDE})",
            path.display(),
            info.width,
            info.height
        );
    }
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).with_context(|| format!("{} is not a PNG", path.display()))?;
    let (w, h) = (frame.width as usize, frame.height as usize);
    let channels = frame.color_type.samples();
    let luma = |x: usize, y: usize| -> u8 {
        let p = &buf[(y * w + x) * channels..(y * w + x + 1) * channels];
        match channels {
            1 | 2 => p[0],
            // RGB(A): luma, an alpha channel ignored.
            _ => ((u32::from(p[0]) * 299 + u32::from(p[1]) * 587 + u32::from(p[2]) * 114) / 1000) as u8,
        }
    };
    // Large pictures are sampled down to at most 2048 pixels a side (a QR
    // code stays readable; rqrr's time grows with the pixels).
    let step = w.max(h).div_ceil(2048).max(1);
    let (sw, sh) = (w.div_ceil(step), h.div_ceil(step));
    let sampled = |x: usize, y: usize| luma((x * step).min(w - 1), (y * step).min(h - 1));
    // rqrr asserts on some hostile pictures (its issue #54): a panic there is
    // a picture that cannot be read, not a crash of the command.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut image = rqrr::PreparedImage::prepare_from_greyscale(sw, sh, sampled);
        image.detect_grids().into_iter().find_map(|grid| grid.decode().ok().map(|(_, text)| text))
    }));
    std::panic::set_hook(hook);
    match found {
        Ok(Some(text)) => Ok(text),
        Ok(None) => bail!("{}: no readable QR code in the picture", path.display()),
        Err(_) => bail!("{}: the picture could not be read as a QR code", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_written_is_read_back() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("card.png");
        let text = "latssiam:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef//example.org/.well-known/latssiam/alice.pem";
        write_png(text, &path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_png(&path).unwrap_or_else(|e| panic!("{e}")), text);
        std::fs::write(&path, b"not a png").unwrap_or_else(|e| panic!("{e}"));
        assert!(read_png(&path).is_err());
        // A picture wider than MAX_SIDE is refused from its header, before any pixel buffer.
        let wide = dir.path().join("wide.png");
        let file = std::fs::File::create(&wide).unwrap_or_else(|e| panic!("{e}"));
        let mut encoder = png::Encoder::new(file, MAX_SIDE + 1, 1);
        encoder.set_color(png::ColorType::Grayscale);
        let mut writer = encoder.write_header().unwrap_or_else(|e| panic!("{e}"));
        writer.write_image_data(&vec![255u8; MAX_SIDE as usize + 1]).unwrap_or_else(|e| panic!("{e}"));
        drop(writer);
        let err = read_png(&wide).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("too large"), "{err}");
    }
}
