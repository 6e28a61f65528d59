//! Device trigger and light on Raspberry Pi GPIO pins through `rppal`.
//!
//! The button is read by edge interrupts (the kernel's GPIO character
//! device), never by polling a level, and debounced by rppal so contact
//! bounce does not take three photographs.

use std::time::Duration;

use rppal::gpio::{Gpio, InputPin, Level, OutputPin, Trigger as Edge};

use dermascope_device::{ButtonConfig, Light, LightError, Trigger, TriggerError, TriggerEvent};

/// Push buttons on GPIO pins, pressed = pulled to ground.
#[derive(Debug)]
pub struct GpioButtons {
    gpio: Gpio,
    capture: InputPin,
    confirm: Option<InputPin>,
}

impl GpioButtons {
    /// Claims the pins and arms falling-edge interrupts with the debounce.
    ///
    /// On a machine that is not a Raspberry Pi (or without access to its
    /// GPIO) this is [`TriggerError::Unavailable`] with what to fix.
    pub fn open(config: &ButtonConfig) -> Result<Self, TriggerError> {
        let gpio = Gpio::new().map_err(|e| TriggerError::Unavailable {
            reason: gpio_unavailable_reason(&e),
        })?;
        let mut capture = input_pin(&gpio, config.capture_pin)?;
        arm(&mut capture, config.debounce)?;
        let confirm = match config.confirm_pin {
            Some(pin) => {
                let mut confirm = input_pin(&gpio, pin)?;
                arm(&mut confirm, config.debounce)?;
                Some(confirm)
            }
            None => None,
        };
        tracing::info!(capture_pin = config.capture_pin, confirm_pin = ?config.confirm_pin, "GPIO buttons armed");
        Ok(Self {
            gpio,
            capture,
            confirm,
        })
    }
}

impl Trigger for GpioButtons {
    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, TriggerError> {
        let mut pins = vec![&self.capture];
        if let Some(confirm) = &self.confirm {
            pins.push(confirm);
        }
        let fired = self
            .gpio
            .poll_interrupts(&pins, false, Some(timeout))
            .map_err(|e| gpio_io("waiting for a button press", e))?;
        Ok(fired.map(|(pin, _event)| {
            if pin.pin() == self.capture.pin() {
                TriggerEvent::Capture
            } else {
                TriggerEvent::Confirm { label: None }
            }
        }))
    }
}

/// The illumination ring, switched by one output pin (high = on).
#[derive(Debug)]
pub struct GpioLight {
    pin: OutputPin,
}

impl GpioLight {
    /// Claims `pin` (BCM numbering) as an output, initially off.
    ///
    /// On a machine that is not a Raspberry Pi this is
    /// [`LightError::Unavailable`] with what to fix.
    pub fn open(pin: u8) -> Result<Self, LightError> {
        let unavailable = |reason| LightError::Unavailable { reason };
        let gpio = Gpio::new().map_err(|e| unavailable(gpio_unavailable_reason(&e)))?;
        let pin = gpio
            .get(pin)
            .map_err(|e| unavailable(format!("GPIO pin {pin}: {e}")))?
            .into_output_low();
        Ok(Self { pin })
    }
}

impl Light for GpioLight {
    fn set(&mut self, on: bool) -> Result<(), LightError> {
        self.pin.write(if on { Level::High } else { Level::Low });
        Ok(())
    }
}

fn input_pin(gpio: &Gpio, pin: u8) -> Result<InputPin, TriggerError> {
    gpio.get(pin)
        .map(|pin| pin.into_input_pullup())
        .map_err(|e| TriggerError::Unavailable {
            reason: format!("GPIO pin {pin}: {e} (BCM numbering; is another program using it?)"),
        })
}

fn arm(pin: &mut InputPin, debounce: Duration) -> Result<(), TriggerError> {
    let number = pin.pin();
    pin.set_interrupt(Edge::FallingEdge, Some(debounce))
        .map_err(|e| gpio_io(&format!("arming the interrupt on pin {number}"), e))
}

fn gpio_io(what: &str, error: rppal::gpio::Error) -> TriggerError {
    match error {
        rppal::gpio::Error::Io(source) => TriggerError::Io {
            what: what.to_string(),
            source,
        },
        other => TriggerError::Unavailable {
            reason: format!("{what}: {other}"),
        },
    }
}

/// Says what to do about a failed `Gpio::new`, by cause.
pub(crate) fn gpio_unavailable_reason(error: &rppal::gpio::Error) -> String {
    let fix = match error {
        rppal::gpio::Error::UnknownModel => {
            "this is not a Raspberry Pi (or its model is unknown to rppal 0.22): \
             run on the device, or use the control-socket trigger and logging light on a PC"
        }
        rppal::gpio::Error::PermissionDenied(_) => {
            "no access to /dev/gpiomem or /dev/gpiochip0: add the daemon's user to the 'gpio' group"
        }
        _ => "check that the GPIO character device /dev/gpiochip0 exists and is readable",
    };
    format!("GPIO cannot be opened ({error}): {fix}")
}
