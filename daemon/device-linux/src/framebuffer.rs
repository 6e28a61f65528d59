//! Device display: the Linux framebuffer (`/dev/fb0`), as HDMI or a
//! DPI/SPI panel with a kernel fbdev driver exposes it.
//!
//! The pixel layout comes from the kernel (`FBIOGET_VSCREENINFO` /
//! `FBIOGET_FSCREENINFO`) and conversion is driven by its channel
//! bitfields, so RGB565, XRGB8888, XBGR8888 and RGB888 all go through one
//! path. Conversion is separate from the ioctls so it is tested on a plain
//! file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use dermascope_device::{fit_screen_to, Display, DisplayError};

const FBIOGET_VSCREENINFO: u64 = 0x4600;
const FBIOGET_FSCREENINFO: u64 = 0x4602;
const FB_TYPE_PACKED_PIXELS: u32 = 0;
const FB_VISUAL_TRUECOLOR: u32 = 2;
const FB_VISUAL_DIRECTCOLOR: u32 = 4;

/// `struct fb_bitfield` from `<linux/fb.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FbBitfield {
    pub offset: u32,
    pub length: u32,
    pub msb_right: u32,
}

/// `struct fb_var_screeninfo` from `<linux/fb.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FbVarScreeninfo {
    pub xres: u32,
    pub yres: u32,
    pub xres_virtual: u32,
    pub yres_virtual: u32,
    pub xoffset: u32,
    pub yoffset: u32,
    pub bits_per_pixel: u32,
    pub grayscale: u32,
    pub red: FbBitfield,
    pub green: FbBitfield,
    pub blue: FbBitfield,
    pub transp: FbBitfield,
    pub nonstd: u32,
    pub activate: u32,
    pub height: u32,
    pub width: u32,
    pub accel_flags: u32,
    pub pixclock: u32,
    pub left_margin: u32,
    pub right_margin: u32,
    pub upper_margin: u32,
    pub lower_margin: u32,
    pub hsync_len: u32,
    pub vsync_len: u32,
    pub sync: u32,
    pub vmode: u32,
    pub rotate: u32,
    pub colorspace: u32,
    pub reserved: [u32; 4],
}

/// `struct fb_fix_screeninfo` from `<linux/fb.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FbFixScreeninfo {
    pub id: [u8; 16],
    pub smem_start: libc::c_ulong,
    pub smem_len: u32,
    pub type_: u32,
    pub type_aux: u32,
    pub visual: u32,
    pub xpanstep: u16,
    pub ypanstep: u16,
    pub ywrapstep: u16,
    pub line_length: u32,
    pub mmio_start: libc::c_ulong,
    pub mmio_len: u32,
    pub accel: u32,
    pub capabilities: u16,
    pub reserved: [u16; 2],
}

/// Where one colour channel sits in a pixel value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Channel {
    offset: u32,
    length: u32,
}

impl Channel {
    /// Places the top `length` bits of an 8-bit sample at `offset`.
    fn place(self, sample: u8) -> u32 {
        if self.length == 0 {
            return 0;
        }
        (u32::from(sample) >> (8 - self.length)) << self.offset
    }
}

/// How the visible screen lies in framebuffer memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FramebufferLayout {
    width: u32,
    height: u32,
    line_length: usize,
    bytes_per_pixel: usize,
    red: Channel,
    green: Channel,
    blue: Channel,
    /// Bits that must be set for an opaque pixel (alpha/padding channel).
    opaque: u32,
    /// Byte offset of the visible area (panning).
    first_byte: u64,
}

impl FramebufferLayout {
    /// Reads the layout from the kernel's screen info, refusing what this
    /// writer cannot produce (palettes, planar modes, odd depths).
    pub(crate) fn from_screeninfo(
        var: &FbVarScreeninfo,
        fix: &FbFixScreeninfo,
        device: &Path,
    ) -> Result<Self, DisplayError> {
        let unsupported = |reason: String| DisplayError::UnsupportedFormat {
            device: device.to_path_buf(),
            reason,
        };
        if fix.type_ != FB_TYPE_PACKED_PIXELS
            || !matches!(fix.visual, FB_VISUAL_TRUECOLOR | FB_VISUAL_DIRECTCOLOR)
        {
            return Err(unsupported(format!(
                "type {} visual {} (need packed-pixel true colour)",
                fix.type_, fix.visual
            )));
        }
        if !matches!(var.bits_per_pixel, 16 | 24 | 32) {
            return Err(unsupported(format!(
                "{} bits per pixel (need 16, 24 or 32)",
                var.bits_per_pixel
            )));
        }
        let channel = |name: &str, field: &FbBitfield, allow_empty: bool| {
            let fits = field.offset + field.length <= var.bits_per_pixel;
            if field.length > 8
                || (!allow_empty && field.length == 0)
                || !fits
                || field.msb_right != 0
            {
                return Err(unsupported(format!(
                    "{name} channel at bit {} length {}{}",
                    field.offset,
                    field.length,
                    if field.msb_right != 0 {
                        " msb-right"
                    } else {
                        ""
                    }
                )));
            }
            Ok(Channel {
                offset: field.offset,
                length: field.length,
            })
        };
        let red = channel("red", &var.red, false)?;
        let green = channel("green", &var.green, false)?;
        let blue = channel("blue", &var.blue, false)?;
        let transp = channel("transparency", &var.transp, true)?;
        let bytes_per_pixel = var.bits_per_pixel as usize / 8;
        let line_length = fix.line_length as usize;
        if var.xres == 0 || var.yres == 0 || line_length < var.xres as usize * bytes_per_pixel {
            return Err(unsupported(format!(
                "{}x{} with {line_length} bytes per line",
                var.xres, var.yres
            )));
        }
        Ok(Self {
            width: var.xres,
            height: var.yres,
            line_length,
            bytes_per_pixel,
            red,
            green,
            blue,
            opaque: transp.place(0xFF),
            first_byte: u64::from(var.yoffset) * line_length as u64
                + u64::from(var.xoffset) * bytes_per_pixel as u64,
        })
    }

    /// Converts a screen of exactly `width * height` RGB pixels into
    /// framebuffer bytes: `height` lines of `line_length` bytes, pixels in
    /// the CPU's byte order (as fbdev expects), line padding zeroed.
    pub(crate) fn encode(&self, rgb: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; self.line_length * self.height as usize];
        let row_pixels = self.width as usize;
        for (line, rgb_row) in out
            .chunks_exact_mut(self.line_length)
            .zip(rgb.chunks_exact(row_pixels * 3))
        {
            for (pixel, sample) in line[..row_pixels * self.bytes_per_pixel]
                .chunks_exact_mut(self.bytes_per_pixel)
                .zip(rgb_row.chunks_exact(3))
            {
                let value = self.red.place(sample[0])
                    | self.green.place(sample[1])
                    | self.blue.place(sample[2])
                    | self.opaque;
                let word = value.to_ne_bytes();
                // fbdev pixels are CPU-order words cut to the pixel size.
                let bytes = if cfg!(target_endian = "little") {
                    &word[..self.bytes_per_pixel]
                } else {
                    &word[4 - self.bytes_per_pixel..]
                };
                pixel.copy_from_slice(bytes);
            }
        }
        out
    }
}

/// The Linux framebuffer device.
#[derive(Debug)]
pub struct FramebufferDisplay {
    device: PathBuf,
    file: File,
    layout: FramebufferLayout,
}

impl FramebufferDisplay {
    /// Opens `device` (usually `/dev/fb0`) and reads its geometry and pixel
    /// layout.
    ///
    /// A missing device is [`DisplayError::NotFound`] saying how to get
    /// one; a layout other than packed 16/24/32-bit true colour is
    /// [`DisplayError::UnsupportedFormat`].
    pub fn open(device: impl Into<PathBuf>) -> Result<Self, DisplayError> {
        let device = device.into();
        let file = File::options()
            .read(true)
            .write(true)
            .open(&device)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => DisplayError::NotFound {
                    device: device.clone(),
                    fix: "no framebuffer: enable the panel's or HDMI's display overlay in \
                          config.txt, or use the PNG display on a PC"
                        .into(),
                },
                io::ErrorKind::PermissionDenied => DisplayError::Io {
                    what: format!(
                        "opening {} (add the daemon's user to the 'video' group)",
                        device.display()
                    ),
                    source,
                },
                _ => DisplayError::Io {
                    what: format!("opening {}", device.display()),
                    source,
                },
            })?;
        let mut var = FbVarScreeninfo::default();
        let mut fix = FbFixScreeninfo::default();
        screeninfo_ioctl(&file, FBIOGET_VSCREENINFO, &mut var)
            .and_then(|()| screeninfo_ioctl(&file, FBIOGET_FSCREENINFO, &mut fix))
            .map_err(|e| DisplayError::UnsupportedFormat {
                device: device.clone(),
                reason: format!("not a framebuffer device ({e})"),
            })?;
        let layout = FramebufferLayout::from_screeninfo(&var, &fix, &device)?;
        tracing::info!(
            device = %device.display(),
            width = layout.width,
            height = layout.height,
            bits_per_pixel = var.bits_per_pixel,
            "framebuffer opened"
        );
        Ok(Self {
            device,
            file,
            layout,
        })
    }

    /// A display over an already open file with a known layout; lets the
    /// writer be tested on a plain file.
    #[cfg(test)]
    pub(crate) fn with_layout(device: PathBuf, file: File, layout: FramebufferLayout) -> Self {
        Self {
            device,
            file,
            layout,
        }
    }
}

impl Display for FramebufferDisplay {
    fn size(&self) -> (u32, u32) {
        (self.layout.width, self.layout.height)
    }

    fn present(&mut self, width: u32, height: u32, rgb: &[u8]) -> Result<(), DisplayError> {
        let fitted = fit_screen_to(width, height, rgb, self.size())?;
        let bytes = self.layout.encode(&fitted);
        self.file
            .write_all_at(&bytes, self.layout.first_byte)
            .map_err(|source| DisplayError::Io {
                what: format!("writing to {}", self.device.display()),
                source,
            })
    }
}

/// Fills `info` with one of the two screen-info ioctls.
fn screeninfo_ioctl<T>(file: &File, request: u64, info: &mut T) -> io::Result<()> {
    // SAFETY: `info` is a live, exclusively borrowed #[repr(C)] mirror of the
    // kernel struct that `request` fills, so the kernel writes within it.
    let status = unsafe { libc::ioctl(file.as_raw_fd(), request as _, info as *mut T) };
    if status == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn bitfield(offset: u32, length: u32) -> FbBitfield {
        FbBitfield {
            offset,
            length,
            msb_right: 0,
        }
    }

    /// What the kernel reports for a 16-bit RGB565 panel, e.g. a 320x240
    /// SPI display under fbtft, with padded lines.
    fn rgb565(width: u32, height: u32, line_length: u32) -> (FbVarScreeninfo, FbFixScreeninfo) {
        let var = FbVarScreeninfo {
            xres: width,
            yres: height,
            xres_virtual: width,
            yres_virtual: height,
            bits_per_pixel: 16,
            red: bitfield(11, 5),
            green: bitfield(5, 6),
            blue: bitfield(0, 5),
            ..Default::default()
        };
        let fix = FbFixScreeninfo {
            line_length,
            visual: FB_VISUAL_TRUECOLOR,
            smem_len: line_length * height,
            ..Default::default()
        };
        (var, fix)
    }

    /// What the kernel reports for 32-bit XRGB8888 (HDMI on a Pi).
    fn xrgb8888(width: u32, height: u32) -> (FbVarScreeninfo, FbFixScreeninfo) {
        let var = FbVarScreeninfo {
            xres: width,
            yres: height,
            bits_per_pixel: 32,
            red: bitfield(16, 8),
            green: bitfield(8, 8),
            blue: bitfield(0, 8),
            ..Default::default()
        };
        let fix = FbFixScreeninfo {
            line_length: width * 4,
            visual: FB_VISUAL_TRUECOLOR,
            ..Default::default()
        };
        (var, fix)
    }

    fn layout(info: (FbVarScreeninfo, FbFixScreeninfo)) -> FramebufferLayout {
        FramebufferLayout::from_screeninfo(&info.0, &info.1, Path::new("/dev/fb-test")).unwrap()
    }

    #[test]
    fn rgb565_pixels_and_line_padding_are_written_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fb");
        // 2x2 screen, 6-byte lines (2 bytes of padding per line).
        fs::write(&path, [0xAAu8; 12]).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let mut display =
            FramebufferDisplay::with_layout(path.clone(), file, layout(rgb565(2, 2, 6)));
        assert_eq!(display.size(), (2, 2));
        let screen = [
            255, 0, 0, /* red */ 0, 255, 0, /* green */
            0, 0, 255, /* blue */ 255, 255, 255, /* white */
        ];
        display.present(2, 2, &screen).unwrap();
        let written = fs::read(&path).unwrap();
        let expected: Vec<u8> = [
            0xF800u16.to_ne_bytes(),
            0x07E0u16.to_ne_bytes(),
            [0, 0],
            0x001Fu16.to_ne_bytes(),
            0xFFFFu16.to_ne_bytes(),
            [0, 0],
        ]
        .concat();
        assert_eq!(written, expected);
    }

    #[test]
    fn xrgb8888_respects_panning_offset_and_sets_no_alpha_bits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fb");
        // Two 1x1 pages; the visible one is the second (yoffset = 1).
        fs::write(&path, [0u8; 8]).unwrap();
        let (mut var, fix) = xrgb8888(1, 1);
        var.yres_virtual = 2;
        var.yoffset = 1;
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let mut display = FramebufferDisplay::with_layout(path.clone(), file, layout((var, fix)));
        display.present(1, 1, &[0x12, 0x34, 0x56]).unwrap();
        let written = fs::read(&path).unwrap();
        assert_eq!(&written[..4], &[0, 0, 0, 0]);
        assert_eq!(&written[4..], &0x0012_3456u32.to_ne_bytes());
    }

    #[test]
    fn argb_transparency_channel_is_made_opaque() {
        let (mut var, fix) = xrgb8888(1, 1);
        var.transp = bitfield(24, 8);
        let bytes = layout((var, fix)).encode(&[0, 0, 0]);
        assert_eq!(bytes, 0xFF00_0000u32.to_ne_bytes());
    }

    #[test]
    fn screens_of_another_size_are_letterboxed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fb");
        fs::write(&path, [0xAAu8; 16]).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let mut display =
            FramebufferDisplay::with_layout(path.clone(), file, layout(xrgb8888(2, 2)));
        // A 2x1 white bar on a 2x2 screen: centring rounds down, so row 0
        // is the bar and row 1 black.
        display.present(2, 1, &[255; 6]).unwrap();
        let written = fs::read(&path).unwrap();
        assert_eq!(&written[..8], &0x00FF_FFFFu32.to_ne_bytes().repeat(2)[..]);
        assert_eq!(&written[8..], &[0u8; 8]);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn screeninfo_mirrors_have_the_kernel_sizes() {
        assert_eq!(std::mem::size_of::<FbVarScreeninfo>(), 160);
        assert_eq!(std::mem::size_of::<FbFixScreeninfo>(), 80);
    }

    #[test]
    fn palette_and_odd_depths_are_refused() {
        let (var, mut fix) = rgb565(2, 2, 4);
        fix.visual = 3; // FB_VISUAL_PSEUDOCOLOR
        let refused = FramebufferLayout::from_screeninfo(&var, &fix, Path::new("/dev/fb9"));
        assert!(matches!(
            refused,
            Err(DisplayError::UnsupportedFormat { .. })
        ));
        let (mut var, fix) = rgb565(2, 2, 4);
        var.bits_per_pixel = 8;
        assert!(FramebufferLayout::from_screeninfo(&var, &fix, Path::new("/dev/fb9")).is_err());
        let (var, fix) = rgb565(4, 2, 4); // line shorter than 4 pixels
        assert!(FramebufferLayout::from_screeninfo(&var, &fix, Path::new("/dev/fb9")).is_err());
    }
}
