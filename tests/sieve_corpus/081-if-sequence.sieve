# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require "fileinto";
if true { fileinto "A"; }
if false { fileinto "B"; } else { fileinto "C"; }
if true { discard; }
