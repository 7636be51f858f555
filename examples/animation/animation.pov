// httpov example: three moons orbit a mirrored sphere above a tiled floor.
// Every motion completes a whole number of turns as clock runs from 0 to 1,
// so with Cyclic_Animation=on the last frame leads straight back to the first.

#version 3.7;

#include "colors.inc"

global_settings {
  assumed_gamma 1.0
}

#declare Turn = 360 * clock;

camera {
  location <0, 3.2, -8.5>
  look_at <0, 0.9, 0>
  angle 48
  rotate <0, -20 * sin(radians(Turn)), 0>
}

light_source { <-6, 12, -9> color rgb <1.0, 0.95, 0.88> }
light_source { <8, 6, -4> color rgb <0.25, 0.3, 0.4> shadowless }

sky_sphere {
  pigment {
    gradient y
    color_map {
      [0.0 color rgb <0.55, 0.62, 0.75>]
      [0.5 color rgb <0.12, 0.18, 0.35>]
    }
  }
}

// Fog fades the tiles into the sky near the horizon.
fog {
  distance 60
  color rgb <0.55, 0.62, 0.75>
}

// Floor: large soft tiles with a faint reflection.
plane {
  y, 0
  pigment {
    checker color rgb <0.82, 0.8, 0.74> color rgb <0.32, 0.36, 0.42>
    scale 1.5
  }
  finish { diffuse 0.85 specular 0.15 reflection { 0.08 } }
}

// Central mirrored sphere on a short pedestal.
cylinder {
  <0, 0, 0>, <0, 0.4, 0>, 0.7
  pigment { color rgb <0.25, 0.22, 0.2> }
  finish { specular 0.3 }
}
sphere {
  <0, 1.4, 0>, 1.0
  pigment { color rgb <0.75, 0.78, 0.82> }
  finish { diffuse 0.2 specular 0.8 roughness 0.005 reflection { 0.65 } }
}

// Ring around the central sphere, tilted and turning once per loop.
torus {
  1.6, 0.05
  pigment { color rgb <0.9, 0.7, 0.25> }
  finish { specular 0.7 roughness 0.01 reflection { 0.3 } }
  rotate <18, 0, 0>
  rotate <0, Turn, 0>
  translate <0, 1.4, 0>
}

// Each moon: radius, orbit radius, height, turns per loop, start phase, colour.
#macro Moon(Size, Orbit, Height, Turns, Phase, Colour)
  sphere {
    <Orbit, Height + 0.3 * sin(radians(Turns * Turn * 2 + Phase)), 0>, Size
    pigment { color Colour }
    finish { diffuse 0.75 specular 0.6 roughness 0.02 }
    rotate <0, Phase + Turns * Turn, 0>
  }
#end

Moon(0.35, 2.6, 1.3, 1, 0, rgb <0.85, 0.2, 0.15>)
Moon(0.28, 3.3, 0.9, 2, 120, rgb <0.2, 0.6, 0.9>)
Moon(0.22, 3.9, 1.8, -1, 240, rgb <0.3, 0.8, 0.35>)
