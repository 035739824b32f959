# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require "fileinto";
fileinto "Reports";
