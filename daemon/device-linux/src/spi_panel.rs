//! Device display: a small ST7789 or ILI9341 panel on the Pi's SPI bus, with
//! a data/command GPIO and an optional reset GPIO, for boards without a
//! kernel framebuffer driver for the panel.
//!
//! Written directly against the MIPI DCS command set rather than through a
//! driver crate: the dozen commands needed fit here, it keeps
//! embedded-hal's version churn out of the build, and the command stream is
//! tested against a recording bus.

use std::thread;
use std::time::Duration;

use rppal::gpio::{Gpio, OutputPin};
use rppal::spi::{Bus, Mode, SlaveSelect, Spi};

use crate::gpio::gpio_unavailable_reason;
use dermascope_device::{fit_screen_to, Display, DisplayError, SpiPanelConfig};

/// spidev's default transfer limit (`bufsiz` module parameter).
const SPI_CHUNK_BYTES: usize = 4096;

const SWRESET: u8 = 0x01;
const SLPOUT: u8 = 0x11;
const NORON: u8 = 0x13;
const INVOFF: u8 = 0x20;
const INVON: u8 = 0x21;
const DISPON: u8 = 0x29;
const CASET: u8 = 0x2A;
const RASET: u8 = 0x2B;
const RAMWR: u8 = 0x2C;
const MADCTL: u8 = 0x36;
const COLMOD: u8 = 0x3A;
/// COLMOD value for 16 bits per pixel (RGB565) on both controllers.
const COLMOD_RGB565: u8 = 0x55;

/// What the panel driver needs from the wires; the real one is SPI plus a
/// D/C pin, the test one records.
pub(crate) trait PanelBus {
    /// Sends one command byte (D/C low) and its parameters (D/C high).
    fn command(&mut self, command: u8, parameters: &[u8]) -> Result<(), DisplayError>;
    /// Sends pixel data (D/C high), at most [`SPI_CHUNK_BYTES`] at a time.
    fn data(&mut self, bytes: &[u8]) -> Result<(), DisplayError>;
    /// Pulses the reset line if there is one.
    fn hardware_reset(&mut self) -> Result<(), DisplayError>;
    /// Waits for the controller (a no-op when recording).
    fn delay(&mut self, duration: Duration);
}

/// Brings the controller from power-on to showing RAM in RGB565.
pub(crate) fn initialise(
    bus: &mut dyn PanelBus,
    config: &SpiPanelConfig,
) -> Result<(), DisplayError> {
    bus.hardware_reset()?;
    bus.command(SWRESET, &[])?;
    bus.delay(Duration::from_millis(150));
    // Both datasheets forbid commands for 120 ms after leaving sleep.
    bus.command(SLPOUT, &[])?;
    bus.delay(Duration::from_millis(120));
    bus.command(COLMOD, &[COLMOD_RGB565])?;
    bus.command(MADCTL, &[config.madctl])?;
    bus.command(if config.invert_colors { INVON } else { INVOFF }, &[])?;
    bus.command(NORON, &[])?;
    bus.delay(Duration::from_millis(10));
    bus.command(DISPON, &[])?;
    bus.delay(Duration::from_millis(20));
    Ok(())
}

/// Writes a whole screen of big-endian RGB565 pixels into the visible
/// window.
pub(crate) fn write_screen(
    bus: &mut dyn PanelBus,
    config: &SpiPanelConfig,
    rgb565_be: &[u8],
) -> Result<(), DisplayError> {
    let window = |start: u16, length: u16| {
        let end = start.saturating_add(length.saturating_sub(1));
        let [start_hi, start_lo] = start.to_be_bytes();
        let [end_hi, end_lo] = end.to_be_bytes();
        [start_hi, start_lo, end_hi, end_lo]
    };
    bus.command(CASET, &window(config.x_offset, config.width))?;
    bus.command(RASET, &window(config.y_offset, config.height))?;
    bus.command(RAMWR, &[])?;
    for chunk in rgb565_be.chunks(SPI_CHUNK_BYTES) {
        bus.data(chunk)?;
    }
    Ok(())
}

/// RGB888 to the panels' wire format: RGB565, high byte first.
pub(crate) fn rgb565_be(rgb: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rgb.len() / 3 * 2);
    for pixel in rgb.chunks_exact(3) {
        let value = (u16::from(pixel[0]) >> 3) << 11
            | (u16::from(pixel[1]) >> 2) << 5
            | u16::from(pixel[2]) >> 3;
        out.extend_from_slice(&value.to_be_bytes());
    }
    out
}

struct SpiBus {
    spi: Spi,
    dc: OutputPin,
    reset: Option<OutputPin>,
}

impl SpiBus {
    fn write(&mut self, bytes: &[u8]) -> Result<(), DisplayError> {
        for chunk in bytes.chunks(SPI_CHUNK_BYTES) {
            self.spi.write(chunk).map_err(|e| DisplayError::Io {
                what: "writing to the SPI panel".into(),
                source: match e {
                    rppal::spi::Error::Io(source) => source,
                    other => std::io::Error::other(other.to_string()),
                },
            })?;
        }
        Ok(())
    }
}

impl PanelBus for SpiBus {
    fn command(&mut self, command: u8, parameters: &[u8]) -> Result<(), DisplayError> {
        self.dc.set_low();
        self.write(&[command])?;
        if !parameters.is_empty() {
            self.dc.set_high();
            self.write(parameters)?;
        }
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), DisplayError> {
        self.dc.set_high();
        self.write(bytes)
    }

    fn hardware_reset(&mut self) -> Result<(), DisplayError> {
        if let Some(reset) = self.reset.as_mut() {
            reset.set_high();
            thread::sleep(Duration::from_millis(5));
            reset.set_low();
            thread::sleep(Duration::from_millis(10));
            reset.set_high();
            thread::sleep(Duration::from_millis(120));
        }
        Ok(())
    }

    fn delay(&mut self, duration: Duration) {
        thread::sleep(duration);
    }
}

/// An ST7789/ILI9341 panel driven over SPI.
///
/// The bus is write-only on most modules, so a panel that is not plugged in
/// cannot be detected: `open` succeeds once SPI and GPIO are usable, and a
/// dark screen then means wiring (check D/C, reset and backlight pins).
pub struct SpiPanelDisplay {
    bus: SpiBus,
    config: SpiPanelConfig,
    // Held so the backlight stays on for as long as the display lives.
    _backlight: Option<OutputPin>,
}

impl std::fmt::Debug for SpiPanelDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiPanelDisplay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SpiPanelDisplay {
    /// Opens the SPI device and pins, resets and initialises the panel.
    ///
    /// Without SPI (`/dev/spidevB.C` missing) or GPIO (not a Raspberry Pi)
    /// this is [`DisplayError::Unavailable`] saying what to enable.
    pub fn open(config: SpiPanelConfig) -> Result<Self, DisplayError> {
        let unavailable = |reason: String| DisplayError::Unavailable { reason };
        let spidev = format!("/dev/spidev{}.{}", config.spi_bus, config.chip_select);
        let bus = spi_bus(config.spi_bus).ok_or_else(|| {
            unavailable(format!("SPI bus {} does not exist (0-6)", config.spi_bus))
        })?;
        let chip_select = slave_select(config.chip_select).ok_or_else(|| {
            unavailable(format!(
                "SPI chip select {} does not exist (0-2)",
                config.chip_select
            ))
        })?;
        if config.width == 0 || config.height == 0 {
            return Err(unavailable("panel size must be non-zero".into()));
        }
        let spi = Spi::new(bus, chip_select, config.clock_hz, Mode::Mode0).map_err(|e| {
            let fix = match &e {
                rppal::spi::Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
                    "enable SPI (dtparam=spi=on in config.txt, or raspi-config) and reboot"
                }
                rppal::spi::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                    "add the daemon's user to the 'spi' group"
                }
                _ => "check the SPI bus settings",
            };
            unavailable(format!("cannot open {spidev} ({e}): {fix}"))
        })?;
        let gpio = Gpio::new().map_err(|e| unavailable(gpio_unavailable_reason(&e)))?;
        let output = |pin: u8, what: &str| {
            gpio.get(pin)
                .map(|pin| pin.into_output_high())
                .map_err(|e| unavailable(format!("{what} pin GPIO {pin}: {e}")))
        };
        let dc = output(config.dc_pin, "D/C")?;
        let reset = config
            .reset_pin
            .map(|pin| output(pin, "reset"))
            .transpose()?;
        let backlight = config
            .backlight_pin
            .map(|pin| output(pin, "backlight"))
            .transpose()?;
        let mut panel = Self {
            bus: SpiBus { spi, dc, reset },
            config,
            _backlight: backlight,
        };
        initialise(&mut panel.bus, &panel.config)?;
        tracing::info!(
            controller = ?panel.config.controller,
            width = panel.config.width,
            height = panel.config.height,
            "SPI panel initialised"
        );
        Ok(panel)
    }
}

impl Display for SpiPanelDisplay {
    fn size(&self) -> (u32, u32) {
        (u32::from(self.config.width), u32::from(self.config.height))
    }

    fn present(&mut self, width: u32, height: u32, rgb: &[u8]) -> Result<(), DisplayError> {
        let fitted = fit_screen_to(width, height, rgb, self.size())?;
        write_screen(&mut self.bus, &self.config, &rgb565_be(&fitted))
    }
}

fn spi_bus(number: u8) -> Option<Bus> {
    Some(match number {
        0 => Bus::Spi0,
        1 => Bus::Spi1,
        2 => Bus::Spi2,
        3 => Bus::Spi3,
        4 => Bus::Spi4,
        5 => Bus::Spi5,
        6 => Bus::Spi6,
        _ => return None,
    })
}

fn slave_select(number: u8) -> Option<SlaveSelect> {
    Some(match number {
        0 => SlaveSelect::Ss0,
        1 => SlaveSelect::Ss1,
        2 => SlaveSelect::Ss2,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Wire {
        Command(u8, Vec<u8>),
        Data(usize),
        Reset,
    }

    #[derive(Default)]
    struct RecordingBus {
        wire: Vec<Wire>,
        data: Vec<u8>,
    }

    impl PanelBus for RecordingBus {
        fn command(&mut self, command: u8, parameters: &[u8]) -> Result<(), DisplayError> {
            self.wire.push(Wire::Command(command, parameters.to_vec()));
            Ok(())
        }
        fn data(&mut self, bytes: &[u8]) -> Result<(), DisplayError> {
            self.wire.push(Wire::Data(bytes.len()));
            self.data.extend_from_slice(bytes);
            Ok(())
        }
        fn hardware_reset(&mut self) -> Result<(), DisplayError> {
            self.wire.push(Wire::Reset);
            Ok(())
        }
        fn delay(&mut self, _: Duration) {}
    }

    #[test]
    fn st7789_initialisation_sets_rgb565_and_inversion() {
        let mut bus = RecordingBus::default();
        initialise(&mut bus, &SpiPanelConfig::st7789_240x240()).unwrap();
        assert_eq!(
            bus.wire,
            vec![
                Wire::Reset,
                Wire::Command(SWRESET, vec![]),
                Wire::Command(SLPOUT, vec![]),
                Wire::Command(COLMOD, vec![0x55]),
                Wire::Command(MADCTL, vec![0x00]),
                Wire::Command(INVON, vec![]),
                Wire::Command(NORON, vec![]),
                Wire::Command(DISPON, vec![]),
            ]
        );
    }

    #[test]
    fn screen_goes_to_the_offset_window_in_spidev_sized_chunks() {
        let config = SpiPanelConfig {
            y_offset: 80,
            ..SpiPanelConfig::st7789_240x240()
        };
        let mut bus = RecordingBus::default();
        let pixels = rgb565_be(&[0x80u8; 240 * 240 * 3]);
        write_screen(&mut bus, &config, &pixels).unwrap();
        assert_eq!(bus.wire[0], Wire::Command(CASET, vec![0, 0, 0, 239]));
        assert_eq!(bus.wire[1], Wire::Command(RASET, vec![0, 80, 1, 63]));
        assert_eq!(bus.wire[2], Wire::Command(RAMWR, vec![]));
        let chunks: Vec<usize> = bus.wire[3..]
            .iter()
            .map(|w| match w {
                Wire::Data(n) => *n,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert!(chunks.iter().all(|&n| n <= SPI_CHUNK_BYTES));
        assert_eq!(chunks.iter().sum::<usize>(), 240 * 240 * 2);
        assert_eq!(bus.data, pixels);
    }

    #[test]
    fn rgb565_is_big_endian_with_truncated_channels() {
        assert_eq!(rgb565_be(&[255, 0, 0]), vec![0xF8, 0x00]);
        assert_eq!(rgb565_be(&[0, 255, 0]), vec![0x07, 0xE0]);
        assert_eq!(rgb565_be(&[0, 0, 255]), vec![0x00, 0x1F]);
        assert_eq!(rgb565_be(&[0x80, 0x80, 0x80]), vec![0x84, 0x10]);
    }

    #[test]
    fn missing_spi_is_a_typed_error() {
        // No /dev/spidev6.2 on a build machine (nor usually on a Pi).
        let config = SpiPanelConfig {
            spi_bus: 6,
            chip_select: 2,
            ..SpiPanelConfig::ili9341_320x240()
        };
        match SpiPanelDisplay::open(config) {
            Err(DisplayError::Unavailable { reason }) => {
                assert!(reason.contains("/dev/spidev6.2"), "{reason}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}
