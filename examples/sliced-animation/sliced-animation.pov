// httpov example: a Newton's cradle on a wooden desk in a corner of a room.
// Over one loop (clock 0 to 1) the right ball swings out and back, then the
// left one does. The chrome balls reflect each other, so every frame is slow
// enough to be worth slicing.
// The scene avoids every feature that samples randomly (crand, area-light
// jitter, media, focal blur, radiosity, photons, subsurface), so a slice of a
// frame renders to exactly the same pixels as in the full frame, provided
// the slice starts on a render-block boundary.

#version 3.7;

#include "colors.inc"

global_settings {
  assumed_gamma 1.0
  max_trace_level 10
}

camera {
  location <2.6, 3.8, -8.8>
  look_at <0, 1.8, 0>
  angle 46
  right x * image_width / image_height
}

light_source { <-4, 8, -6> color rgb <1.0, 0.95, 0.88> }
light_source { <5, 5, -8> color rgb <0.25, 0.27, 0.32> }

#declare Chrome = texture {
  pigment { color rgb <0.80, 0.82, 0.85> }
  finish {
    ambient 0
    diffuse 0.15
    specular 0.9
    roughness 0.002
    metallic
    reflection { 0.8 metallic }
  }
}

#declare Walnut = texture {
  pigment {
    wood
    turbulence 0.08
    color_map {
      [0.0 color rgb <0.32, 0.18, 0.09>]
      [0.6 color rgb <0.42, 0.25, 0.13>]
      [1.0 color rgb <0.22, 0.12, 0.06>]
    }
    scale 0.15
    rotate <0, 90, 0>
  }
  finish { diffuse 0.8 specular 0.35 roughness 0.015 reflection { 0.06 } }
}

#declare Oak = texture {
  pigment {
    wood
    turbulence 0.05
    color_map {
      [0.0 color rgb <0.70, 0.52, 0.32>]
      [0.7 color rgb <0.78, 0.60, 0.38>]
      [1.0 color rgb <0.58, 0.42, 0.25>]
    }
    scale 0.4
    rotate <0, 90, 0>
  }
  finish { diffuse 0.8 specular 0.25 roughness 0.02 reflection { 0.05 } }
}

// Room: desk top as the floor, two walls behind it.
plane {
  y, 0
  texture { Oak }
}
plane {
  z, 4
  pigment { color rgb <0.72, 0.70, 0.64> }
  finish { diffuse 0.8 }
}
plane {
  x, -6
  pigment { color rgb <0.55, 0.62, 0.68> }
  finish { diffuse 0.8 }
}

// Cradle dimensions: five balls hang from two parallel bars.
#declare Ball_Radius = 0.3;
#declare Bar_Height = 3.0;
#declare Bar_Spread = 0.6;   // half the distance between the two bars in z
#declare Hang_Length = 2.1;  // pivot to ball centre
#declare Frame_Half_Width = 1.9;
#declare Max_Swing = 32;     // degrees

// Base and frame.
box {
  <-2.3, 0, -1.0>, <2.3, 0.25, 1.0>
  texture { Walnut }
}
#for (Side, -1, 1, 2)
  #for (Depth, -1, 1, 2)
    cylinder {
      <Side * Frame_Half_Width, 0.25, Depth * Bar_Spread>,
      <Side * Frame_Half_Width, Bar_Height, Depth * Bar_Spread>, 0.045
      texture { Chrome }
    }
    sphere {
      <Side * Frame_Half_Width, Bar_Height, Depth * Bar_Spread>, 0.045
      texture { Chrome }
    }
  #end
#end
#for (Depth, -1, 1, 2)
  cylinder {
    <-Frame_Half_Width, Bar_Height, Depth * Bar_Spread>,
    <Frame_Half_Width, Bar_Height, Depth * Bar_Spread>, 0.045
    texture { Chrome }
  }
#end

// Swing angle of the outer balls: positive lifts the right ball to the
// right, negative lifts the left ball to the left.
#declare Swing = Max_Swing * sin(2 * pi * clock);

// One pendulum hanging at X: ball and two strings, turned about its pivot.
#macro Pendulum(X, Angle)
  union {
    sphere { <0, -Hang_Length, 0>, Ball_Radius texture { Chrome } }
    #for (Depth, -1, 1, 2)
      cylinder {
        <0, -Hang_Length + Ball_Radius * 0.9, 0>, <0, 0, Depth * Bar_Spread>, 0.008
        pigment { color rgb <0.9, 0.9, 0.88> }
        finish { diffuse 0.8 }
      }
    #end
    rotate <0, 0, Angle>
    translate <X, Bar_Height, 0>
  }
#end

#for (I, 0, 4)
  #declare Angle = 0;
  #if (I = 0 & Swing < 0)
    #declare Angle = Swing;
  #end
  #if (I = 4 & Swing > 0)
    #declare Angle = Swing;
  #end
  Pendulum((I - 2) * 2 * Ball_Radius, Angle)
#end

// Wall mirror in a wooden frame behind the cradle. The chrome balls and the
// mirror reflect each other, which makes each frame costly to trace.
union {
  difference {
    box { <-3.2, 0.8, 3.85>, <3.2, 4.6, 4.0> }
    box { <-3.0, 1.0, 3.8>, <3.0, 4.4, 4.1> }
    texture { Walnut }
  }
  box {
    <-3.0, 1.0, 3.9>, <3.0, 4.4, 3.95>
    pigment { color rgb <0.1, 0.1, 0.1> }
    finish { ambient 0 diffuse 0.05 specular 0.6 reflection { 0.9 } }
  }
}

// A wavy glass ring beside the cradle as a paperweight: an isosurface,
// tilted towards the camera so its waves show.
isosurface {
  function {
    pow(sqrt(x * x + z * z) - 0.4, 2) / 0.02
    + pow(y * 1.0, 2) / 0.01
    - 1
    + 0.4 * sin(6 * atan2(z, x))
  }
  contained_by { box { <-0.65, -0.2, -0.65>, <0.65, 0.2, 0.65> } }
  max_gradient 55
  texture {
    pigment { color rgbf <0.85, 0.95, 0.9, 0.92> }
    finish { diffuse 0.05 specular 0.9 roughness 0.001 reflection { 0.05, 0.9 fresnel } conserve_energy }
  }
  interior { ior 1.5 }
  rotate <-60, -20, 0>
  translate <-3.0, 0.62, -1.4>
}
