# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require "fileinto";
if false { fileinto "A"; }
elsif false { fileinto "B"; }
else { fileinto "C"; }
if true { fileinto "D"; }
