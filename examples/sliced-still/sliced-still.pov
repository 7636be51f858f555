// httpov example: a fountain courtyard ringed by marble columns.
// The textures come from the local include materials.inc, so a job that
// renders this scene must carry that file along with the scene.
// The scene avoids every feature that samples randomly (crand, area-light
// jitter, media, focal blur, radiosity, photons, subsurface), so any
// horizontal slice renders to exactly the same pixels as in a full render,
// provided it starts on a render-block boundary.

#version 3.7;

#include "colors.inc"
#include "materials.inc"

global_settings {
  assumed_gamma 1.0
  max_trace_level 8
}

camera {
  location <2.5, 4.2, -11>
  look_at <0, 1.4, 0>
  angle 52
  right x * image_width / image_height
}

light_source { <-30, 40, -25> color rgb <1.0, 0.94, 0.85> }
light_source { <20, 15, -30> color rgb <0.18, 0.22, 0.3> shadowless }

sky_sphere {
  pigment {
    gradient y
    color_map {
      [0.00 color rgb <0.85, 0.80, 0.72>]
      [0.25 color rgb <0.45, 0.60, 0.85>]
      [1.00 color rgb <0.15, 0.30, 0.65>]
    }
  }
}

// Paved courtyard inside the hedge, plain lawn beyond it.
cylinder {
  <0, -1, 0>, <0, 0, 0>, 10
  texture { M_Paving }
}
plane {
  y, -0.001
  pigment { color rgb <0.25, 0.42, 0.15> }
  finish { diffuse 0.8 }
}

// Fountain basin: a hollow stone ring with water inside.
#declare Basin_Radius = 2.6;
difference {
  cylinder { <0, 0, 0>, <0, 0.6, 0>, Basin_Radius }
  cylinder { <0, 0.15, 0>, <0, 0.7, 0>, Basin_Radius - 0.25 }
  texture { M_Marble }
}
torus {
  Basin_Radius - 0.125, 0.16
  translate <0, 0.6, 0>
  texture { M_Marble }
}
cylinder {
  <0, 0.15, 0>, <0, 0.45, 0>, Basin_Radius - 0.25
  texture { M_Water }
  interior { ior 1.33 }
}

// Glass beads resting on the rim of the basin.
#for (I, 0, 15)
  sphere {
    <Basin_Radius - 0.125, 0.9, 0>, 0.14
    material { M_Glass }
    rotate <0, I * 22.5 + 11.25, 0>
  }
#end

// Central pillar carrying a brass sphere.
cylinder { <0, 0, 0>, <0, 1.8, 0>, 0.28 texture { M_Marble } }
torus { 0.32, 0.08 translate <0, 1.8, 0> texture { M_Brass } }
sphere { <0, 2.45, 0>, 0.6 texture { M_Brass } }

// Fluted column with a base and a capital, standing on the ground at x, z.
#macro Column(X, Z)
  union {
    box { <-0.45, 0, -0.45>, <0.45, 0.25, 0.45> }
    difference {
      cylinder { <0, 0.25, 0>, <0, 4.25, 0>, 0.3 }
      #for (I, 0, 11)
        cylinder {
          <0.3, 0.4, 0>, <0.3, 4.1, 0>, 0.045
          rotate <0, I * 30, 0>
        }
      #end
    }
    cylinder { <0, 4.25, 0>, <0, 4.4, 0>, 0.38 }
    box { <-0.45, 4.4, -0.45>, <0.45, 4.6, 0.45> }
    texture { M_Marble }
    translate <X, 0, Z>
  }
#end

// Six columns on the far half of a circle around the fountain.
#for (I, 0, 5)
  #declare Angle = radians(195 + I * 30);
  Column(6 * cos(Angle), -6 * sin(Angle))
#end

// Architrave resting on the columns: a curved slab following their circle.
intersection {
  difference {
    cylinder { <0, 4.6, 0>, <0, 5.1, 0>, 6.5 }
    cylinder { <0, 4.5, 0>, <0, 5.2, 0>, 5.5 }
  }
  plane { -z, -0.6 }
  texture { M_Marble }
}

// Clipped hedge on an arc behind the colonnade.
intersection {
  difference {
    cylinder { <0, 0, 0>, <0, 1.8, 0>, 10.5 }
    cylinder { <0, -0.1, 0>, <0, 1.9, 0>, 9.5 }
  }
  plane { -z, -1 }
  texture { M_Hedge scale 3 }
}

// Glass sphere on a low plinth in front, refracting the basin.
box { <-3.9, 0, -3.4>, <-2.7, 0.5, -2.2> texture { M_Marble } }
sphere { <-3.3, 1.1, -2.8>, 0.6 material { M_Glass } }

// Twisted glass spire on a low plinth in front of the fountain.
// It is an isosurface, which is slow to trace and gives the slices real work.
box { <-0.45, 0, -0.45>, <0.45, 0.3, 0.45> texture { M_Marble } translate <2.0, 0, -3.7> }
isosurface {
  function {
    sqrt(pow(x * cos(y * 2.5) - z * sin(y * 2.5), 2) / 0.09
         + pow(x * sin(y * 2.5) + z * cos(y * 2.5), 2) / 0.0144) - (1 - y / 2.2)
  }
  contained_by { box { <-0.32, 0, -0.32>, <0.32, 2.2, 0.32> } }
  max_gradient 10
  material { M_Glass }
  translate <2.0, 0.3, -3.7>
}

// Terracotta pots with round shrubs to the right.
#macro Pot(X, Z, Size)
  union {
    difference {
      cone { <0, 0, 0>, 0.35, <0, 0.8, 0>, 0.5 }
      cone { <0, 0.1, 0>, 0.28, <0, 0.85, 0>, 0.43 }
      texture { M_Terracotta }
    }
    torus { 0.5, 0.05 translate <0, 0.8, 0> texture { M_Terracotta } }
    sphere { <0, 1.1, 0>, 0.5 texture { M_Hedge } }
    scale Size
    translate <X, 0, Z>
  }
#end

Pot(3.6, -2.0, 1.0)
Pot(4.5, -0.6, 0.8)
