//! Option enums have one name per value, used the same way by the library (`FromStr`, `Display`,
//! serde), the CLI (its possible values) and the docs: `prompt-left`, `exact-fill`, `i64`, ...

/// Give a fieldless enum its names: `NAMES`, `name()`, `FromStr`, `Display`, and serde as the name.
/// `option` is what an error calls the value: the option's name as the library and Python spell it.
macro_rules! named_enum {
    ($ty:ident as $option:literal { $($variant:ident = $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value's name, as the CLI, the manifest and the docs spell it.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            /// This value's name.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = crate::Error;

            fn from_str(s: &str) -> crate::Result<Self> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(crate::Error::InvalidOption {
                        name: $option,
                        reason: format!("{s:?} is not one of: {}", Self::NAMES.join(", ")),
                    }),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use named_enum;
